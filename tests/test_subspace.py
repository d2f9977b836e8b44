"""DID/SAID wrappers, intrinsic prompt tuning and the d90 search: the controller contracts for subspaces.

z = 0 is the base model exactly; only z (and λ) train; SAID with λ ≡ 1 equals DID; detaching restores the model
bit for bit; the weights used are θ₀ + (λ ⊙) P z with P the projection's own matrix.
"""

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from torch.func import functional_call, grad

import deltactl as dc
from deltactl.subspace import (
    IntrinsicPrompt,
    PromptAutoencoder,
    d90_from_curve,
    d90_search,
    intrinsic,
    plot_d90,
    subspace,
)
from deltactl.train.loop import TrainConfig, fit
from deltactl.train.models import LabelWordClassifier

CASES = {
    "t5": (tiny_t5, tiny_batch, lambda m, b: m(**b).logits, lambda b: {**b, "labels": b["decoder_input_ids"]}),
    "bert": (tiny_bert, tiny_bert_batch, lambda m, b: m(**b).logits, lambda b: {**b, "labels": torch.tensor([0, 2])}),
}
WRAPS = {
    "all-weights": lambda model, **kw: intrinsic(model, 12, **kw),
    "lora": lambda model, **kw: subspace(model, "lora", 12, r=2, **kw),
    "adapter": lambda model, **kw: subspace(model, "adapter", 12, r=3, **kw),
}


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            [n for n, _ in model.named_modules()])


def perturb(sub, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sub.z.copy_(torch.randn(sub.z.shape, generator=g, dtype=sub.z.dtype) * scale)
        if getattr(sub, "said", False):
            sub.scales.copy_(1 + torch.rand(sub.scales.shape, generator=g, dtype=sub.scales.dtype))


# Every projection over all weights; the controller wraps with two (the projection code path is shared).
COMBOS = [("all-weights", "fastfood"), ("all-weights", "sparse"), ("all-weights", "dense"), ("lora", "fastfood"),
          ("lora", "sparse"), ("adapter", "fastfood")]


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("wrap,projection", COMBOS)
@pytest.mark.parametrize("said", [False, True])
def test_zero_z_is_the_base_model_and_detach_is_exact(family, wrap, said, projection):
    make, batch_of, outputs, labelled = CASES[family]
    model, batch = make(), batch_of()
    before, state = outputs(model, batch), snapshot(model)
    sub = WRAPS[wrap](model, said=said, projection=projection)
    assert torch.equal(outputs(sub, batch), before)  # z = 0: exactly the frozen model
    perturb(sub)
    assert not torch.allclose(outputs(sub, batch), before)  # … and z moves it
    sub.detach()
    after = snapshot(model)
    assert after[0].keys() == state[0].keys() and all(torch.equal(after[0][k], v) for k, v in state[0].items())
    assert after[1:] == state[1:]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(outputs(model, batch), before)
    with pytest.raises(RuntimeError, match="detached"):
        sub(**batch)


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("wrap", WRAPS)
@pytest.mark.parametrize("said", [False, True])
def test_only_z_and_scales_train(family, wrap, said):
    make, batch_of, _, labelled = CASES[family]
    model = make()
    sub = WRAPS[wrap](model, said=said)
    assert not any(p.requires_grad for p in model.parameters())
    expected = {"z", "scales"} if said else {"z"}
    assert set(sub.trainable()) == expected
    assert sub.num_parameters() == 12 + (len(sub.names) if said else 0)
    perturb(sub)
    sub(**labelled(batch_of())).loss.backward()
    assert sub.z.grad.abs().sum() > 0
    if said:
        assert sub.scales.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("wrap", WRAPS)
def test_said_with_unit_scales_equals_did(wrap):
    outputs = []
    for said in (False, True):
        model = tiny_t5()
        sub = WRAPS[wrap](model, said=said)
        perturb(sub)
        if said:
            with torch.no_grad():
                sub.scales.fill_(1.0)
        outputs.append(sub(**tiny_batch()).logits)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("said", [False, True])
def test_weights_are_base_plus_projected_z(said):
    model = tiny_bert()
    sub = intrinsic(model, 5, said=said, projection="fastfood", exclude=("*embeddings*",))
    assert not any("embeddings" in n for n in sub.names)
    perturb(sub)
    flat = sub.projection.matrix() @ sub.z.detach()
    start = 0
    for i, (name, value) in enumerate(sub.merged().items()):
        size = sub.base[name].numel()
        scale = sub.scales[i].detach() if said else 1.0
        expected = sub.base[name] + scale * flat[start : start + size].view_as(value)
        torch.testing.assert_close(value, expected, atol=1e-12, rtol=0)
        start += size
    assert start == sub.D


def test_projection_runs_once_per_forward():
    model = tiny_t5()
    sub = intrinsic(model, 4)
    calls = []
    sub.projection.register_forward_hook(lambda *a: calls.append(1))
    sub(**tiny_batch())
    assert len(calls) == 1


def test_torch_func_grad_matches_autograd():
    model = tiny_t5()
    sub = subspace(model, "lora", 6, r=2, said=True)
    perturb(sub)
    batch = {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}
    theta = {n: p.detach().clone() for n, p in sub.trainable().items()}
    g = grad(lambda th: functional_call(sub, th, (), batch).loss)(theta)
    sub(**batch).loss.backward()
    for n, p in sub.trainable().items():
        torch.testing.assert_close(g[n], p.grad, atol=1e-12, rtol=1e-9)


def test_trains_with_the_trainer(tmp_path):
    model = tiny_bert()
    sub = intrinsic(model, 16, said=True)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(2, 64, (6,), generator=g), i % 3) for i in range(24)]

    def collate(rows):
        return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.tensor([r[1] for r in rows])}

    losses = []

    def loss_fn(m, batch):
        return m(**batch).loss

    def evaluate():
        with torch.no_grad():
            losses.append(loss_fn(sub, collate(data)).item())
        return {"neg_loss": -losses[-1]}

    evaluate()
    config = TrainConfig(lr=0.3, epochs=3, batch_size=8, eval_every=9, warmup=0.0)
    outcome = fit(sub, sub.trainable(), data, collate, loss_fn, evaluate, "neg_loss", config, tmp_path, lambda p: None)
    assert outcome.steps == 9 and losses[-1] < losses[0]
    assert not any(p.requires_grad for p in model.parameters())


def test_subspace_refuses_bad_input():
    model = tiny_bert()
    with pytest.raises(ValueError, match="not a parameter"):
        from deltactl.subspace import Subspace

        Subspace(model, ["no.such.weight"], 3)
    with pytest.raises(ValueError, match="nothing"):
        intrinsic(model, 3, exclude=("*",))
    with pytest.raises(ValueError, match="unknown projection"):
        subspace(model, "lora", 3, projection="nope")
    assert not hasattr(model, "deltactl")  # the failed wrap left no controller behind


# ---- intrinsic prompt tuning --------------------------------------------------------------------------------------


def test_intrinsic_prompt_uses_the_back_projection_and_trains_only_z():
    model, batch = tiny_bert(), tiny_bert_batch()
    delta = dc.attach(model, "prompt", length=3)
    name = next(n for n, _ in model.named_parameters() if n.startswith("deltactl."))
    torch.manual_seed(0)
    ae = PromptAutoencoder(3, 16, intrinsic=4, hidden=8).double()
    prompts = torch.randn(5, 3, 16, dtype=torch.float64)
    assert ae.encode(prompts).shape == (5, 4) and ae(prompts).shape == prompts.shape
    ipt = IntrinsicPrompt(model, name, ae)
    assert set(ipt.trainable()) == {"z"}
    with torch.no_grad():
        ipt.z.normal_()
    out = ipt(**batch).logits
    rows = dict(model.named_parameters())[name]
    with torch.no_grad():
        rows.copy_(ae.decode(ipt.z))  # the same prompt, written in place
    torch.testing.assert_close(model(**batch).logits, out, atol=1e-12, rtol=0)
    ipt(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert ipt.z.grad.abs().sum() > 0 and all(p.grad is None for p in ae.parameters())
    ipt.detach()
    delta.detach()
    with pytest.raises(ValueError, match="shape"):
        IntrinsicPrompt(model, "bert.embeddings.word_embeddings.weight", ae)


# ---- d90 and the label-word head ----------------------------------------------------------------------------------


def test_d90_from_a_curve(tmp_path):
    res = d90_from_curve([100, 10, 1000], [0.8, 0.5, 0.95], full=1.0)
    assert res.dims == [10, 100, 1000] and res.d90 == 1000
    assert 100 < res.d90_interpolated < 1000
    assert d90_from_curve([10, 100], [0.5, 0.6], full=1.0).d90 is None
    assert d90_from_curve([10, 100], [0.95, 0.99], full=1.0).d90_interpolated is None
    seen = []
    early = d90_search(lambda d: seen.append(d) or d / 100, [50, 95, 99], full=1.0, stop_early=True)
    assert early.d90 == 95 and seen == [50, 95]
    import matplotlib.figure

    figures = []
    save = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):  # the figure as it is saved, so its plotted data can be read back
        figures.append(fig)
        return save(fig, *args, **kwargs)

    matplotlib.figure.Figure.savefig = keep
    try:
        plot_d90({"DID": res, "SAID": early}, tmp_path / "f.png")
    finally:
        matplotlib.figure.Figure.savefig = save
    assert (tmp_path / "f.png").stat().st_size > 1000
    (ax,) = figures[0].axes
    curves = [line for line in ax.lines if len(line.get_xdata()) > 2 or line.get_marker() == "o"]
    assert [list(c.get_xdata()) for c in curves] == [res.dims, early.dims]
    assert [list(c.get_ydata()) for c in curves] == [res.metrics, early.metrics]
    levels = sorted({line.get_ydata()[0] for line in ax.lines if line not in curves})
    assert levels == pytest.approx(sorted({0.9, 1.0}))  # 90% of full training and full training
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["DID (d90=1000)", "SAID (d90=95)"]
    with pytest.raises(ValueError, match="as many"):
        d90_from_curve([1, 2], [0.1], full=1.0)


def test_d90_is_the_first_d_reaching_the_target_and_interpolates_in_log_d():
    """d90 = min{d : metric(d) ≥ share · full} (reaching the target counts), and between the grid points (d₀, m₀)
    below and (d₁, m₁) at it, log d is linear in the metric: d = exp(log d₀ + t (log d₁ − log d₀)) with
    t = (target − m₀)/(m₁ − m₀), i.e. the geometric interpolation d₀^(1−t) d₁^t. Rules out a strict > (exceeding
    only) and linear interpolation in d."""
    exact = d90_from_curve([10, 100, 1000], [0.25, 0.5, 0.75], full=1.0, share=0.5)  # 0.5 · 1.0 is exact in binary
    assert exact.d90 == 100  # 0.5 reaches the target 0.5 exactly
    assert exact.d90_interpolated == pytest.approx(100.0, rel=1e-12)  # t = 1: the grid point itself
    assert d90_search(lambda d: {10: 0.25, 100: 0.5, 1000: 0.75}[d], [10, 100, 1000], full=1.0, share=0.5).d90 == 100
    # t = 1/2 halfway in the metric: the geometric mean √(10 · 1000) = 100, not the arithmetic (10 + 1000)/2 = 505
    mid = d90_from_curve([10, 1000], [0.5, 1.0], full=1.0, share=0.75)
    assert mid.d90 == 1000 and mid.d90_interpolated == pytest.approx(100.0, rel=1e-12)
    # t = 1/4: 10^(3/4) · 1000^(1/4) = 10^1.5
    quarter = d90_from_curve([10, 1000], [0.5, 1.0], full=2.0, share=0.3125)
    assert quarter.d90_interpolated == pytest.approx(10**1.5, rel=1e-12)


def test_label_word_head_is_cosine_to_frozen_label_embeddings():
    encoder = tiny_bert(head=False)

    def tokenizer(words, **_):
        ids = torch.tensor([[5 + i, 9] for i, _ in enumerate(words)])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    head = LabelWordClassifier(encoder, tokenizer, ["no", "yes", "maybe"])
    batch = tiny_bert_batch()
    logits = head(**batch)
    pooled = torch.nn.functional.normalize(
        (encoder(**batch).last_hidden_state * batch["attention_mask"][..., None]).sum(1)
        / batch["attention_mask"].sum(1, keepdim=True), dim=-1)
    torch.testing.assert_close(logits, 20 * pooled @ head.labels.T, atol=1e-12, rtol=0)
    assert not any(n for n, _ in head.named_parameters() if not n.startswith("bert."))
