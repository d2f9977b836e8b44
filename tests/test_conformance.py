"""The contracts every registered controller meets (DESIGN.md §3), for each method on each T5 variant and BERT.

``case`` (conftest) runs a test on every family: the tiny T5 variants and a tiny BERT (BertForSequenceClassification,
so sites live under ``bert.``). T5's decoding checks stay T5-only; a last test runs on real MiniLM weights.
"""

import copy

import pytest
import torch
from conftest import mergeable, tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from torch.func import functional_call, grad, jvp
from transformers import PretrainedConfig
from transformers.models.llama import modeling_llama

import deltactl as dc
from deltactl.control.accounting import closed_form
from deltactl.control.controller import NotMergeable
from deltactl.methods import REGISTRY, make_example

METHODS = sorted(REGISTRY)


def config(method, **extra):
    """The method's small example (``DeltaConfig.small``), so the tiny model stays tiny."""
    return make_example(method, **extra)


# Options a family needs where a method's default names another family's layout: last-layer tuning defaults to the
# encoder stack, and a decoder-only model has only a decoder.
FAMILY_OPTIONS = {(family, "last_layer"): {"stack": "decoder"} for family in ("gpt2", "llama")}
FAMILY_OPTIONS[("gpt2", "named")] = {"sites": ("decoder.0.attn.qkv.weight", "*.ffn.ln.weight")}
FAMILY_OPTIONS[("llama", "named")] = {"sites": ("decoder.0.attn.q.weight", "*.ffn.ln.weight")}


def case_config(case, method, **extra):
    """``config(method)`` with the options the case's family needs."""
    return config(method, **{**FAMILY_OPTIONS.get((case.family, method), {}), **extra})


def perturb(delta, seed=0, scale=0.3):
    """Give δ random values, so that the control is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def assert_outputs_close(a, b, atol=1e-12):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


def configs(model) -> list[PretrainedConfig]:
    """The distinct configs the model's modules read (T5 gives each stack its own)."""
    found = [getattr(m, "config", None) for m in model.modules()]
    return list({id(c): c for c in found if isinstance(c, PretrainedConfig)}.values())


@pytest.mark.parametrize("method", METHODS)
def test_zero_control_is_the_pretrained_model(case, method):
    model, batch = case.model(), case.batch()
    before = case.outputs(model, batch)
    cfg = case_config(case, method)
    for zero in {cfg.zero(), cfg} if cfg.zero() == cfg else [cfg.zero()]:
        delta = dc.attach(model, zero)
        assert_outputs_close(case.outputs(model, batch), before)
        delta.detach()


def assert_detach_is_bit_exact(model, cfg, outputs, batch):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    modules = [n for n, _ in model.named_modules()]
    impls = [c._attn_implementation for c in configs(model)]
    before = outputs(model, batch)

    delta = dc.attach(model, cfg)
    perturb(delta)
    outputs(model, batch)
    delta.detach()

    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [n for n, _ in model.named_modules()] == modules
    assert [c._attn_implementation for c in configs(model)] == impls
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(not any(k.startswith("_deltactl") for k in vars(m)) for m in model.modules())
    assert all(not any(k.startswith("_deltactl") for k in vars(c)) for c in configs(model))
    after = outputs(model, batch)
    assert all(torch.equal(x, y) for x, y in zip(after, before, strict=True))


@pytest.mark.parametrize("method", METHODS)
def test_detach_is_bit_exact(case, method):
    assert_detach_is_bit_exact(case.model(), case_config(case, method), case.outputs, case.batch())


@pytest.mark.parametrize("method", METHODS)
def test_only_delta_trains_with_the_closed_form_count(case, method):
    model, batch = case.model(), case.batch()
    delta = dc.attach(model, case_config(case, method))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.parameters()}
    assert delta.num_parameters() == closed_form(delta.config, delta.backbone) > 0
    perturb(delta)
    out = model(**case.with_labels(batch))
    out.loss.backward()
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached δ parameter {name}"
        else:
            assert p.grad is None, f"gradient leaked into base parameter {name}"


def _t5_norm_in_float64(self, hidden_states):
    """T5LayerNorm without its float32 variance, so that a float64 model is float64 throughout."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _llama_attention_in_float64(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Llama's eager attention with its softmax in the inputs' dtype instead of float32."""
    key, value = (modeling_llama.repeat_kv(t, module.num_key_value_groups) for t in (key, value))
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@pytest.mark.parametrize("method", METHODS)
def test_functional_grad_and_jvp(case, method, monkeypatch):
    model, batch = case.model(), case.with_labels(case.batch())
    if case.family == "t5":  # see the central difference below
        monkeypatch.setattr(type(model.encoder.final_layer_norm), "forward", _t5_norm_in_float64)
    if case.family == "llama":  # Llama's RMS norm and its attention softmax compute in float32
        monkeypatch.setattr(type(model.model.norm), "forward", _t5_norm_in_float64)
        monkeypatch.setattr(modeling_llama, "eager_attention_forward", _llama_attention_in_float64)
    delta = dc.attach(model, case_config(case, method))
    perturb(delta)
    names = [f"deltactl.{delta.name}.{n}" for n, _ in delta.named_parameters()]
    params = {n: p.detach().clone() for n, p in zip(names, delta.parameters())}

    def loss(theta):
        return functional_call(model, theta, args=(), kwargs=batch).loss

    g = grad(loss)(params)
    model(**batch).loss.backward()
    for n, p in zip(names, delta.parameters()):
        torch.testing.assert_close(g[n], p.grad, atol=1e-10, rtol=1e-8)

    # Forward mode agrees with reverse mode: jvp(v) = ⟨∇L, v⟩.
    tangent = {n: torch.randn_like(v) for n, v in params.items()}
    _, directional = jvp(loss, (params,), (tangent,))
    expected = sum((g[n] * tangent[n]).sum() for n in names)
    torch.testing.assert_close(directional, expected, atol=1e-6, rtol=1e-5)

    # Both modes against a central difference of the loss along the tangent, a reference that shares no derivative
    # code with them. BERT is float64 throughout: truncation ~ε² and rounding ~1e-16/ε leave ~1e-9. T5 keeps some
    # float32 inside a float64 model: its norm's variance (replaced above, else the difference is good to ~1% only)
    # and its attention softmax, which still leaves ~2e-6 of rounding in the difference.
    # Masks train through a straight-through estimator: their gradient is by design not the loss's derivative.
    if method == "mask":
        return
    eps = 1e-5
    with torch.no_grad():
        up, down = (loss({n: params[n] + sign * eps * tangent[n] for n in names}) for sign in (1, -1))
    difference = (up - down) / (2 * eps)
    torch.testing.assert_close(directional, difference, atol=1e-8, rtol=1e-6 if case.family == "bert" else 2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_the_controller(t5, batch, method):  # T5 only: BERT does not decode
    delta = dc.attach(t5, config(method))
    perturb(delta)
    src = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    out = t5.generate(**src, max_new_tokens=5, do_sample=False, use_cache=False, output_scores=True,
                      return_dict_in_generate=True)
    uncached = out.sequences
    # An independent greedy decode: full forward passes through the controlled model, argmax, EOS then padding.
    cfg = t5.config
    tokens = torch.full((2, 1), cfg.decoder_start_token_id, dtype=torch.long)
    done = torch.zeros(2, dtype=torch.bool)
    with torch.no_grad():
        for step in range(uncached.shape[1] - 1):
            logits = t5(**src, decoder_input_ids=tokens).logits[:, -1]
            torch.testing.assert_close(out.scores[step].to(logits.dtype), logits, atol=1e-5, rtol=1e-6)
            nxt = torch.where(done, cfg.pad_token_id, logits.argmax(-1))
            done |= nxt == cfg.eos_token_id
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        delta.disable()
        base_first = t5(**src, decoder_input_ids=tokens[:, :1]).logits[:, -1]
        delta.enable()
    assert torch.equal(uncached, tokens)
    assert (out.scores[0] - base_first).abs().max() > 1e-6  # the controller acts on what is decoded
    # transformers sizes the decoder cache by num_layers, so generate() with a cache fails on T5 configs whose
    # decoder is deeper than the encoder, with or without deltactl; the cache path is compared on the others.
    if t5.config.num_decoder_layers == t5.config.num_layers:
        cached = t5.generate(**src, max_new_tokens=5, do_sample=False, use_cache=True)
        assert torch.equal(cached, uncached)  # the cache path sees the controller exactly as a full forward does
    delta.detach()


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(case, method, tmp_path):
    model, batch = case.model(), case.batch()
    delta = dc.attach(model, case_config(case, method))
    perturb(delta)
    expected = case.outputs(model, batch)
    delta.save(tmp_path / "d")
    delta.detach()

    loaded = dc.load(model, tmp_path / "d")
    assert loaded.config == delta.config
    assert all(torch.equal(x, y) for x, y in zip(case.outputs(model, batch), expected, strict=True))
    loaded.detach()

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="trained on .* but this model is another one: its weights differ"):
        dc.load(other, tmp_path / "d")
    assert not hasattr(other, "deltactl")  # a refused load leaves the model untouched


@pytest.mark.parametrize("method", METHODS)
def test_chain_equals_applying_one_then_the_other(case, method):
    model, batch = case.model(), case.batch()
    second = config("lora") if method != "lora" else config("adapter")
    one = dc.attach(model, case_config(case, method))
    two = dc.attach(model, second)
    perturb(one, seed=1)
    perturb(two, seed=2)
    expected = case.outputs(model, batch)
    states = [one.controller.state_dict(), two.controller.state_dict()]
    one.detach()
    two.detach()

    chained = dc.attach(model, dc.chain(case_config(case, method), second))
    for part, state in zip(chained.controller.parts, states):
        part.load_state_dict(state)
    assert_outputs_close(case.outputs(model, batch), expected, atol=0)


def test_sum_adds_the_controls(case):
    model, batch = case.model(), case.batch()
    summed = dc.attach(model, dc.sum(config("adapter"), config("adapter")))
    perturb(summed)
    first, second = summed.controller.parts
    site = "decoder.0.ffn.out" if case.decoder_only else "encoder.0.ffn.out"
    d = summed.backbone.sites[site].dims["d"]
    x, y = torch.randn(2, 3, d, dtype=torch.float64), torch.randn(2, 3, d, dtype=torch.float64)
    expected = y + (first.control(site, x, y) - y) + (second.control(site, x, y) - y)
    torch.testing.assert_close(summed.controller.control(site, x, y), expected, atol=0, rtol=0)
    # Controls that add a term independent of y sum exactly as they chain.
    out_sum = case.outputs(model, batch)
    summed.detach()
    model2 = case.model()
    chained = dc.attach(model2, dc.chain(config("adapter"), config("adapter")))
    chained.controller.load_state_dict(summed.controller.state_dict())
    assert not torch.allclose(case.outputs(model2, batch)[-1], out_sum[-1])  # adapters read y: sum ≠ chain
    chained.detach()
    lin = [config("lora", sites=("*.q",)), config("bitfit", sites=("*.q",))]
    a, b = dc.attach(model, dc.sum(*lin)), dc.attach(model2, dc.chain(*lin))
    perturb(a)
    b.controller.load_state_dict(a.controller.state_dict())
    assert_outputs_close(case.outputs(model, batch), case.outputs(model2, batch), atol=1e-12)


def test_sum_refuses_memory_sites(case):
    with pytest.raises(ValueError, match="sum adds controls at output sites"):
        dc.attach(case.model(), dc.sum(config("prefix"), config("lora")))


ENCODERS = {  # models without a task head: (a fresh model, a batch)
    "t5": (lambda: tiny_t5(encoder_only=True), {k: v for k, v in tiny_batch().items() if k != "decoder_input_ids"}),
    "bert": (lambda: tiny_bert(head=False), tiny_bert_batch()),
}


@pytest.mark.parametrize("family", list(ENCODERS))
@pytest.mark.parametrize("method", METHODS)
def test_encoder_only_model(family, method):
    make, batch = ENCODERS[family]
    model = make()
    before = model(**batch)
    delta = dc.attach(model, config(method).zero())
    after = model(**batch)
    torch.testing.assert_close(after.last_hidden_state, before.last_hidden_state, atol=1e-12, rtol=0)
    if family == "bert":
        torch.testing.assert_close(after.pooler_output, before.pooler_output, atol=1e-12, rtol=0)
    delta.detach()


# ---- real pre-trained weights: all-MiniLM-L6-v2 (BERT, 6 layers, d = 384), float32, each method's defaults ----


def minilm_outputs(model, batch):
    out = model(**batch)
    return out.last_hidden_state, out.pooler_output


@pytest.mark.parametrize("method", METHODS)
def test_real_minilm_zero_control_and_detach(minilm, method):
    model, batch = minilm
    assert model.dtype == torch.float32 and (batch["attention_mask"] == 0).any()
    before = minilm_outputs(model, batch)
    cfg = make_example(method, small=False)  # the method's defaults, as a user would attach it
    delta = dc.attach(model, cfg.zero())
    assert delta.num_parameters() == closed_form(cfg.zero(), delta.backbone)
    assert_outputs_close(minilm_outputs(model, batch), before, atol=0)
    delta.detach()
    assert_detach_is_bit_exact(model, cfg, minilm_outputs, batch)


def test_sum_of_a_chain_sums_the_chained_control():
    inner = dc.chain(config("adapter", sites=("encoder.0.ffn.out",)), config("adapter", sites=("encoder.0.ffn.out",)))
    outer = dc.attach(tiny_t5(), dc.sum(inner, config("bitfit", sites=("*.ffn.wo",))))
    perturb(outer)
    chained, _ = outer.controller.parts
    x, y = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    first, second = chained.parts
    expected = second.control("encoder.0.ffn.out", x, first.control("encoder.0.ffn.out", x, y))
    torch.testing.assert_close(outer.controller.control("encoder.0.ffn.out", x, y), expected, atol=1e-12, rtol=0)


# ---- merge / unmerge (methods whose control is a change of weights) ------------------------------------------------

# T5's (and Llama's) RMS norms have no bias to merge BitFit into: there BitFit merges where it acts on linear layers.
MERGE_SITES = {(family, "bitfit"): {"sites": ("*.q", "*.wo")} for family in ("t5", "llama", "mistral", "qwen2")}  # RMS
# Merged and unmerged round differently: float64 to ~1e-15; bfloat16 (8 significant bits, rounding at every layer)
# to a few percent of the output's scale.
MERGE_TOL = {torch.float64: 1e-10, torch.bfloat16: 2**-5}


@pytest.mark.parametrize("dtype", list(MERGE_TOL), ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged_and_unmerge_is_exact(case, method, dtype, request):
    model, batch = case.model().to(dtype), case.batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    delta = dc.attach(model, case_config(case, method, **MERGE_SITES.get((case.family, method), {})))
    perturb(delta, scale=0.1)
    if not mergeable(delta):
        with pytest.raises(NotMergeable, match="cannot be merged"):
            delta.merge()
        return
    with torch.no_grad():
        unmerged = case.outputs(model, batch)
        delta.merge()
        assert delta.merged and not any(p.requires_grad for p in delta.parameters())
        base_keys = {k for k in model.state_dict() if not k.startswith("deltactl.")}
        changed = not all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
        assert changed or base_keys > state.keys()  # weights changed (or biases appeared: BitFit on T5 linears)
        merged = case.outputs(model, batch)
        for x, y in zip(merged, unmerged, strict=True):
            scale = 1.0 if dtype == torch.float64 else y.abs().max().item()
            assert (x - y).abs().max().item() <= MERGE_TOL[dtype] * scale
        delta.unmerge()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items() if k in model.state_dict())
        assert {k for k in model.state_dict() if not k.startswith("deltactl.")} == state.keys()
        assert all(torch.equal(a, b) for a, b in zip(case.outputs(model, batch), unmerged))
        delta.merge()
        delta.detach()  # detaching a merged delta unmerges it first
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
