"""Half precision: on a bfloat16/float16 base δ is float32 (as PEFT's ``autocast_adapter_dtype``), the laws compute
in δ's dtype and hand the model its own dtype back.

- Outputs against a float64 reference with the same δ values (non-zero, perturbed; rounded to float32 first so all
  sides use identical numbers), on all-MiniLM-L6-v2 and a small random T5 in bfloat16: LoRA and IA3 err no more
  than PEFT does on identical weights; prefix rows (and their MLP) in float32 err no more than in bfloat16.
- Every method: δ float32, outputs in the base dtype, zero control exact, gradients reach δ in float32.
- The bfloat16 rounding trap: one Adam step of lr 1e-4 changes float32 δ; the same step on bfloat16 δ is lost.
- Weight-editing methods keep the base weights' dtype through merge and unmerge them exactly; save/load round-trips
  and refuses, naming the dtypes, what it cannot check.
- The trainer on a float16 model: float32 δ with dynamic loss scaling trains and resumes exactly; float16 weights
  that would themselves train are refused, and a float16 overflow says to use bfloat16 or float32.
"""

import copy
import json

import pytest
import torch
from conftest import VOCAB, tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5

import deltactl as dc
from deltactl.control.controller import NotMergeable, site_key
from deltactl.control.registry import sites_of
from deltactl.methods import REGISTRY, make_config, make_example
from deltactl.train.loop import TrainConfig, fit
from deltactl.train.models import SequenceClassifier

HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def small_t5():
    return tiny_t5(dtype=torch.float32, d_model=64, d_kv=16, num_heads=4, d_ff=128)


@pytest.fixture(scope="module")
def models(minilm):
    """``models(name, dtype)``: MiniLM or the small T5 in a dtype, made once (attach and detach leave it exact)."""
    cache = {}

    def get(name, dtype):
        if (name, dtype) not in cache:
            cache[name, dtype] = copy.deepcopy(minilm[0] if name == "minilm" else small_t5()).to(dtype)
        return cache[name, dtype]

    return get


# PEFT's names for deltactl's default LoRA (q, v) and IA3 (k, v, FFN output with its input scaled) sites.
PEFT_TARGETS = {
    "minilm": {"lora": (["query", "value"], None),
               "ia3": (r".*\.(key|value)|.*layer\.\d+\.output\.dense", r".*layer\.\d+\.output\.dense")},
    "t5": {"lora": (["q", "v"], None), "ia3": (["k", "v", "wo"], ["wo"])},
}
OPTIONS = {"lora": {"r": 8, "alpha": 16.0}, "ia3": {}, "prefix": {"length": 5, "mid_dim": 32}}
SCALE = {"lora": 0.2, "ia3": 0.3, "prefix": 0.05}


def batch_and_output(name, minilm):
    if name == "minilm":
        return minilm[1], lambda m, b: m(**b).last_hidden_state
    return tiny_batch(), lambda m, b: m(**b).logits


def perturbed_values(model64, method, options, seed=0):
    """δ values away from the identity, as float32 numbers held in float64 (identical on every side)."""
    torch.manual_seed(seed)
    delta = dc.attach(model64, method, **options)
    g = torch.Generator().manual_seed(seed)
    values = {}
    for n, p in delta.controller.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64) * SCALE[method]
        values[n] = (p.detach() + noise).float().double()
    delta.detach()
    return values


def attach_with(model, method, options, values, dtype=None):
    """Attach ``method`` to ``model`` (δ in ``dtype``, default the attach default) with δ set to ``values``."""
    delta = dc.attach(model, method, dtype=dtype, **options)
    with torch.no_grad():
        for n, p in delta.controller.named_parameters():
            p.copy_(values[n])
    return delta


def output_with(model, method, options, values, batch, out, dtype=None):
    delta = attach_with(model, method, options, values, dtype)
    try:
        with torch.no_grad():
            return out(model, batch), {p.dtype for p in delta.parameters()}
    finally:
        delta.detach()


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def peft_twin(model, method, name, sites, values):
    """PEFT's LoRA/IA3 on a copy of ``model`` with the same weights at the same sites."""
    from peft import IA3Config, LoraConfig, get_peft_model

    targets, feedforward = PEFT_TARGETS[name][method]
    config = (
        LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False) if method == "lora"
        else IA3Config(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)
    )
    twin = get_peft_model(copy.deepcopy(model), config)
    assert len([n for n, _ in twin.named_parameters() if "lora_A" in n or "ia3_l" in n]) == len(sites)
    with torch.no_grad():
        for site in sites:
            module = twin.base_model.model.get_submodule(site.module)
            key = f"layers.{site_key(site.name)}."
            if method == "lora":
                module.lora_A["default"].weight.copy_(values[key + "A"])
                module.lora_B["default"].weight.copy_(values[key + "B"])
            else:
                module.ia3_l["default"].copy_(values[key + "l"].view_as(module.ia3_l["default"]))
    assert {p.dtype for p in twin.parameters() if p.requires_grad} == {torch.float32}  # PEFT's autocast
    return twin


# ---- accuracy against float64 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("name", ["minilm", "t5"])
def test_error_against_float64_is_at_most_peft_s(minilm, models, name, method):
    batch, out = batch_and_output(name, minilm)
    model64, model16 = models(name, torch.float64), models(name, torch.bfloat16)
    values = perturbed_values(model64, method, OPTIONS[method])
    reference, _ = output_with(model64, method, OPTIONS[method], values, batch, out)
    ours, dtypes = output_with(model16, method, OPTIONS[method], values, batch, out)
    sites = sites_of(make_config(method, **OPTIONS[method]), dc.backbone_for(model16).sites)
    with torch.no_grad():
        theirs = out(peft_twin(model16, method, name, sites, values), batch)
        base = out(model64, batch)
    assert max_abs(reference, base) > 0.1  # the control matters at this scale
    ulp = 2**-8 * reference.abs().max().item()  # one bfloat16 rounding at the output's scale
    assert max_abs(ours, reference) <= max_abs(theirs, reference) + ulp
    assert rms(ours, reference) <= 1.02 * rms(theirs, reference), (rms(ours, reference), rms(theirs, reference))
    assert max_abs(ours, theirs) <= ulp  # (in practice they agree bit for bit)
    assert dtypes == {torch.float32} and ours.dtype == theirs.dtype == torch.bfloat16


@pytest.mark.parametrize("reparameterize", [False, True], ids=["rows", "mlp"])
@pytest.mark.parametrize("name", ["minilm", "t5"])
def test_prefix_in_float32_errs_no_more_than_in_bfloat16(minilm, models, name, reparameterize):
    """The rows reach attention rounded to its dtype either way (as PEFT casts its prefix to the model's dtype), so
    outputs err no more than with bfloat16 δ; the rows themselves (an MLP's output with ``reparameterize``) are
    float32-accurate before that rounding, where bfloat16 δ computes the MLP in bfloat16."""
    batch, out = batch_and_output(name, minilm)
    model64, model16 = models(name, torch.float64), models(name, torch.bfloat16)
    options = {**OPTIONS["prefix"], "reparameterize": reparameterize}
    values = perturbed_values(model64, "prefix", options)
    reference, _ = output_with(model64, "prefix", options, values, batch, out)
    ours, dtypes = output_with(model16, "prefix", options, values, batch, out)
    narrow, _ = output_with(model16, "prefix", options, values, batch, out, dtype=torch.bfloat16)
    with torch.no_grad():
        base_error = rms(out(model16, batch), out(model64, batch))
    assert dtypes == {torch.float32} and ours.dtype == torch.bfloat16
    assert rms(reference, out(model64, batch)) > 10 * base_error  # the prefix matters at this scale
    assert rms(ours, reference) <= 1.05 * rms(narrow, reference), (rms(ours, reference), rms(narrow, reference))

    rows = {}
    for model, dtype in ((model64, None), (model16, None), (model16, torch.bfloat16)):
        delta = attach_with(model, "prefix", options, values, dtype)
        with torch.no_grad():
            rows[dtype, model is model64] = torch.cat([delta.controller.site_rows(s.name).double().flatten()
                                                       for s in delta.controller.sites])
        delta.detach()
    exact = rows[None, True]
    assert max_abs(rows[None, False], exact) <= 1e-5 * exact.abs().max()
    if reparameterize:  # bfloat16 δ computes the MLP in bfloat16
        assert max_abs(rows[torch.bfloat16, False], exact) > 1e-3 * exact.abs().max()


# ---- every method: dtypes, zero control, gradients ----------------------------------------------------------------


def tiny(family_name, dtype):
    if family_name == "t5":
        return tiny_t5(dtype=dtype), tiny_batch(), lambda m, b: m(**b).logits
    return tiny_bert(dtype=dtype), tiny_bert_batch(), lambda m, b: m(**b).logits


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_delta_is_float32_outputs_keep_the_base_dtype_and_gradients_reach_it(method, dtype):
    for family_name in ("t5", "bert"):
        model, batch, out = tiny(family_name, dtype)
        with torch.no_grad():
            before = out(model, batch)
        cfg = make_example(method)
        delta = dc.attach(model, cfg.zero())
        assert {p.dtype for p in delta.parameters()} <= {torch.float32}
        with torch.no_grad():
            assert torch.equal(out(model, batch), before)  # zero control is exact in half precision too
        delta.detach()
        delta = dc.attach(model, cfg)
        with torch.no_grad():
            for p in delta.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.1)
        model.train(False)
        logits = out(model, batch)
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        logits.float().square().mean().backward()
        grads = [p.grad for p in delta.parameters()]
        assert all(g is not None and g.dtype == torch.float32 for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        assert not any(p.grad is not None for n, p in model.named_parameters() if not n.startswith("deltactl."))
        delta.detach()


def test_attach_dtype_follows_the_base_or_the_caller():
    assert {p.dtype for p in dc.attach(tiny_t5(), "lora", r=2).parameters()} == {torch.float64}
    assert {p.dtype for p in dc.attach(tiny_t5(dtype=torch.float32), "lora", r=2).parameters()} == {torch.float32}
    narrow = dc.attach(tiny_t5(dtype=torch.bfloat16), "lora", r=2, dtype=torch.bfloat16)
    assert {p.dtype for p in narrow.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="floating-point dtype"):
        dc.attach(tiny_t5(), "lora", r=2, dtype=torch.int8)


# ---- the rounding trap: small updates -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_one_small_adam_step_changes_float32_delta(minilm, models, method):
    """In bfloat16 a weight near 1 has a spacing of 2⁻⁷: a 1e-4 step of IA3's l = 1 is lost entirely, and about
    40% of the steps of LoRA's A (entries ~0.05, spacing 2⁻¹²) are; in float32 every step lands."""
    half, batch = models("minilm", torch.bfloat16), minilm[1]
    kept = {}
    for delta_dtype in (None, torch.bfloat16):
        options = {"r": 8, "sites": ("*.q", "*.v")} if method == "lora" else {}
        delta = dc.attach(half, method, dtype=delta_dtype, **options)
        if method == "lora":
            with torch.no_grad():  # B ≠ 0, so A has a gradient
                for name, p in delta.controller.named_parameters():
                    if name.endswith(".B"):
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        params = [p for n, p in delta.controller.named_parameters() if n.endswith((".A", ".l"))]
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.Adam(params, lr=1e-4)
        half(**batch).last_hidden_state.float().square().mean().backward()
        optimizer.step()
        moved = sum(int(((p.detach() != b) & (p.grad != 0)).sum()) for p, b in zip(params, before))
        kept[delta_dtype] = moved / sum(int((p.grad != 0).sum()) for p in params)
        delta.detach()
    assert kept[None] == 1.0  # float32 δ: every entry with a gradient moved
    assert kept[torch.bfloat16] < (0.01 if method == "ia3" else 0.8), kept


# ---- merge / unmerge and save / load in half precision ------------------------------------------------------------

WEIGHT_EDITING = ["lora", "ia3", "bitfit", "ln_tuning", "diff_pruning", "mask", "named", "last_layer", "selective"]


@pytest.mark.parametrize("method", WEIGHT_EDITING)
def test_merge_keeps_the_base_dtype_and_unmerge_is_exact(method):
    model, batch = tiny_t5(dtype=torch.bfloat16), tiny_batch()
    options = {"sites": ("*.q", "*.wo")} if method == "bitfit" else {}  # T5's RMS norms have no bias to merge into
    state = {k: v.clone() for k, v in model.state_dict().items()}
    delta = dc.attach(model, make_example(method, **options))
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype) * 0.05)
        unmerged = model(**batch).logits
        delta.merge()
        merged = model(**batch).logits
    base = {k: v for k, v in model.state_dict().items() if not k.startswith("deltactl.")}
    assert {v.dtype for v in base.values()} == {torch.bfloat16}  # a bias BitFit creates is bfloat16 too
    assert {p.dtype for p in delta.parameters()} == {torch.float32}
    if delta.controller.sites[0].kind == "parameter":
        # θ' = θ + Δ is rounded once to bfloat16 in the forward pass, and merging writes that same θ'
        assert torch.equal(merged, unmerged)
    else:
        assert (merged.float() - unmerged.float()).abs().max() <= 2**-5 * unmerged.abs().max()
    delta.unmerge()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    delta.detach()
    assert model.state_dict().keys() == state.keys()


def test_methods_that_do_not_edit_weights_still_refuse_to_merge():
    delta = dc.attach(tiny_t5(dtype=torch.bfloat16), "adapter", r=2)
    with pytest.raises(NotMergeable):
        delta.merge()


@pytest.mark.parametrize("method", ["lora", "ia3", "prefix", "prompt", "bitfit", "ln_tuning"])
def test_save_load_round_trips_float32_delta_on_a_bfloat16_base(tmp_path, method):
    model, batch = tiny_t5(dtype=torch.bfloat16), tiny_batch()
    twin = copy.deepcopy(model)
    delta = dc.attach(model, make_example(method))
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 1e-3)
        expected = model(**batch).logits
    delta.save(tmp_path)
    loaded = dc.load(twin, tmp_path)
    mine, theirs = delta.controller.state_dict(), loaded.controller.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, mine[k]) for k, v in theirs.items())
    with torch.no_grad():
        assert torch.equal(twin(**batch).logits, expected)


def test_load_casts_a_delta_saved_in_another_dtype(tmp_path):
    model = tiny_t5(dtype=torch.bfloat16)
    narrow = dc.attach(copy.deepcopy(model), "ia3", dtype=torch.bfloat16)  # as deltas were kept before
    with torch.no_grad():
        for p in narrow.parameters():
            p.add_(0.25)
    narrow.save(tmp_path)
    loaded = dc.load(model, tmp_path)
    assert all(p.dtype == torch.float32 and torch.equal(p, torch.full_like(p, 1.25)) for p in loaded.parameters())


def test_a_delta_moves_between_dtypes_of_one_base_only_where_that_can_be_checked(tmp_path):
    full = tiny_t5(dtype=torch.float32)
    half = copy.deepcopy(full).to(torch.bfloat16)
    trained = dc.attach(half, "lora", r=2)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01)
    trained.save(tmp_path / "on_bf16")
    loaded = dc.load(copy.deepcopy(full), tmp_path / "on_bf16")  # bfloat16 → float32: cast and checked
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), trained.parameters()))

    dc.attach(full, "lora", r=2).save(tmp_path / "on_fp32")
    refused = r"saved on a float32 base, and this model is in bfloat16.*dtype=torch\.float32"
    with pytest.raises(ValueError, match=refused):
        dc.load(copy.deepcopy(half), tmp_path / "on_fp32")
    other = tiny_t5(seed=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="saved on a bfloat16 base, and this model is in float32: cast to bfloat16"):
        dc.load(other, tmp_path / "on_bf16")
    assert not dc.deltas(other)  # nothing left attached by a refused load


# ---- the trainer ---------------------------------------------------------------------------------------------------


def synthetic_pairs(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, VOCAB, (6,), generator=g), torch.randint(2, VOCAB, (3,), generator=g)) for _ in range(n)]


def collate(pairs):
    return {"input_ids": torch.stack([a for a, _ in pairs]), "labels": torch.stack([b for _, b in pairs])}


CONFIG = TrainConfig(lr=1e-2, epochs=1.0, batch_size=6, eval_every=2, seed=3)


def train_fp16(out, config=CONFIG, method="lora", loss_fn=None):
    model = tiny_t5(dtype=torch.float16)
    delta = dc.attach(model, method, **({"r": 2} if method == "lora" else {})) if method != "ft" else None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    data = synthetic_pairs()

    def evaluate():
        with torch.no_grad():
            return {"score": -model(**collate(data[:6])).loss.item()}

    outcome = fit(model, trainable, data, collate, loss_fn or (lambda m, b: m(**b).loss), evaluate, "score", config,
                  out, save_best=lambda folder: delta and delta.save(folder))
    return outcome, model, {n: p.detach().clone() for n, p in trainable.items()}


def test_float16_trains_float32_delta_with_loss_scaling_and_resumes_exactly(tmp_path, capsys):
    start = {n: p.detach().clone() for n, p in dc.attach(tiny_t5(dtype=torch.float16), "lora", r=2).named_parameters()}
    whole, model, trained = train_fp16(tmp_path / "whole")
    assert whole.status == "finished" and whole.steps == 4
    assert "float16 model: δ trains in float32 with dynamic loss scaling" in capsys.readouterr().out
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in trained.values())
    assert any(not torch.equal(p, start[n.removeprefix("deltactl.lora.")]) for n, p in trained.items())
    assert {p.dtype for n, p in model.named_parameters() if not n.startswith("deltactl.")} == {torch.float16}

    first, _, _ = train_fp16(tmp_path / "split", TrainConfig(**{**CONFIG.__dict__, "stop_after": 2}))
    assert first.status == "halted"
    saved = json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())
    assert saved["scaler"]["scale"] > 0  # the loss scale is part of the resumable state
    second, _, resumed = train_fp16(tmp_path / "split")
    assert second.status == "finished" and all(torch.equal(resumed[n], trained[n]) for n in trained)


def test_float16_weights_that_would_train_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"are float16.*Train a delta method instead.*float32"):
        train_fp16(tmp_path, method="ft")


def test_a_float16_overflow_says_to_use_bfloat16_or_float32(tmp_path, capsys):
    def overflowing(model, batch):
        return model(**batch).loss * torch.tensor(float("inf"), dtype=torch.float16)

    outcome, _, _ = train_fp16(tmp_path, loss_fn=overflowing)
    assert outcome.status == "diverged"
    said = capsys.readouterr().out
    assert "training loss became inf at step 1" in said and "bfloat16 or float32" in said


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_the_trainer_s_encoder_head_reads_a_half_precision_encoder(dtype):
    classifier = SequenceClassifier(tiny_bert(dtype=dtype, head=False), 3)
    dc.attach(classifier.bert, "lora", r=2)
    batch = tiny_bert_batch()
    logits = classifier(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
