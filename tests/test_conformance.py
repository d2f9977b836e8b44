"""The contracts every registered controller meets (DESIGN.md §3), checked for each method on each T5 variant."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_t5
from torch.func import functional_call, grad, jvp

import deltactl as dc
from deltactl.control.accounting import closed_form
from deltactl.methods import REGISTRY, make_config

METHODS = sorted(REGISTRY)
# Small settings so the tiny model stays tiny; each is the method's own config, defaults otherwise.
SMALL = {"lora": {"r": 3}, "adapter": {"r": 5}, "prefix": {"length": 3, "mid_dim": 7}, "prompt": {"length": 3}}


def config(method, **extra):
    return make_config(method, **{**SMALL.get(method, {}), **extra})


def perturb(delta, seed=0, scale=0.3):
    """Give δ random values, so that the control is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def outputs(model, batch):
    out = model(**batch)
    return out.encoder_last_hidden_state, out.logits


def assert_outputs_close(a, b, atol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_zero_control_is_the_pretrained_model(t5, batch, method):
    before = outputs(t5, batch)
    cfg = config(method)
    for zero in {cfg.zero(), cfg} if cfg.zero() == cfg else [cfg.zero()]:
        delta = dc.attach(t5, zero)
        assert_outputs_close(outputs(t5, batch), before)
        delta.detach()


@pytest.mark.parametrize("method", METHODS)
def test_detach_is_bit_exact(t5, batch, method):
    state = {k: v.clone() for k, v in t5.state_dict().items()}
    flags = [p.requires_grad for p in t5.parameters()]
    modules = [n for n, _ in t5.named_modules()]
    impls = (t5.encoder.config._attn_implementation, t5.decoder.config._attn_implementation)
    before = outputs(t5, batch)

    delta = dc.attach(t5, config(method))
    perturb(delta)
    outputs(t5, batch)
    delta.detach()

    assert t5.state_dict().keys() == state.keys()
    assert all(torch.equal(t5.state_dict()[k], v) for k, v in state.items())
    assert [p.requires_grad for p in t5.parameters()] == flags
    assert [n for n, _ in t5.named_modules()] == modules
    assert (t5.encoder.config._attn_implementation, t5.decoder.config._attn_implementation) == impls
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in t5.modules())
    assert all(not any(k.startswith("_deltactl") for k in vars(m)) for m in t5.modules())
    after = outputs(t5, batch)
    assert all(torch.equal(x, y) for x, y in zip(after, before))


@pytest.mark.parametrize("method", METHODS)
def test_only_delta_trains_with_the_closed_form_count(t5, batch, method):
    delta = dc.attach(t5, config(method))
    trainable = {id(p) for p in t5.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in delta.parameters()}
    assert delta.num_parameters() == closed_form(delta.config, delta.backbone) > 0
    perturb(delta)
    out = t5(**batch, labels=batch["decoder_input_ids"])
    out.loss.backward()
    for name, p in t5.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached δ parameter {name}"
        else:
            assert p.grad is None, f"gradient leaked into base parameter {name}"


@pytest.mark.parametrize("method", METHODS)
def test_functional_grad_and_jvp(t5, batch, method):
    delta = dc.attach(t5, config(method))
    perturb(delta)
    names = [f"deltactl.{delta.name}.{n}" for n, _ in delta.named_parameters()]
    params = {n: p.detach().clone() for n, p in zip(names, delta.parameters())}
    labels = batch["decoder_input_ids"]

    def loss(theta):
        return functional_call(t5, theta, args=(), kwargs={**batch, "labels": labels}).loss

    g = grad(loss)(params)
    t5(**batch, labels=labels).loss.backward()
    for n, p in zip(names, delta.parameters()):
        torch.testing.assert_close(g[n], p.grad, atol=1e-10, rtol=1e-8)

    # Forward mode agrees with reverse mode: jvp(v) = ⟨∇L, v⟩, to float32 precision: T5LayerNorm computes
    # its variance in float32 even in a float64 model, so the two modes round differently.
    tangent = {n: torch.randn_like(v) for n, v in params.items()}
    _, directional = jvp(loss, (params,), (tangent,))
    expected = sum((g[n] * tangent[n]).sum() for n in names)
    torch.testing.assert_close(directional, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_generate_with_the_controller(t5, batch, method):
    delta = dc.attach(t5, config(method))
    perturb(delta)
    src = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    uncached = t5.generate(**src, max_new_tokens=5, do_sample=False, use_cache=False)
    assert uncached.shape[0] == 2 and uncached.shape[1] > 1
    # transformers sizes the decoder cache by num_layers, so generate() with a cache fails on T5 configs whose
    # decoder is deeper than the encoder, with or without deltactl; the cache path is compared on the others.
    if t5.config.num_decoder_layers == t5.config.num_layers:
        cached = t5.generate(**src, max_new_tokens=5, do_sample=False, use_cache=True)
        assert torch.equal(cached, uncached)  # the cache path sees the controller exactly as a full forward does
    delta.detach()


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(t5, batch, method, tmp_path):
    delta = dc.attach(t5, config(method))
    perturb(delta)
    expected = outputs(t5, batch)
    delta.save(tmp_path / "d")
    delta.detach()

    loaded = dc.load(t5, tmp_path / "d")
    assert loaded.config == delta.config
    assert all(torch.equal(x, y) for x, y in zip(outputs(t5, batch), expected))
    loaded.detach()

    other = copy.deepcopy(t5)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="trained on .* but this model is another one: its weights differ"):
        dc.load(other, tmp_path / "d")
    assert not hasattr(other, "deltactl")  # a refused load leaves the model untouched


@pytest.mark.parametrize("method", METHODS)
def test_chain_equals_applying_one_then_the_other(batch, method):
    model = tiny_t5()
    second = config("lora") if method != "lora" else config("adapter")
    one = dc.attach(model, config(method))
    two = dc.attach(model, second)
    perturb(one, seed=1)
    perturb(two, seed=2)
    expected = outputs(model, batch)
    states = [one.controller.state_dict(), two.controller.state_dict()]
    one.detach()
    two.detach()

    chained = dc.attach(model, dc.chain(config(method), second))
    for part, state in zip(chained.controller.parts, states):
        part.load_state_dict(state)
    assert_outputs_close(outputs(model, batch), expected, atol=0)


def test_sum_adds_the_controls(batch):
    model = tiny_t5()
    summed = dc.attach(model, dc.sum(config("adapter"), config("adapter")))
    perturb(summed)
    first, second = summed.controller.parts
    site = "encoder.0.ffn.out"
    x, y = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 3, 16, dtype=torch.float64)
    expected = y + (first.control(site, x, y) - y) + (second.control(site, x, y) - y)
    torch.testing.assert_close(summed.controller.control(site, x, y), expected, atol=0, rtol=0)
    # Controls that add a term independent of y sum exactly as they chain.
    out_sum = outputs(model, batch)
    summed.detach()
    model2 = tiny_t5()
    chained = dc.attach(model2, dc.chain(config("adapter"), config("adapter")))
    chained.controller.load_state_dict(summed.controller.state_dict())
    assert not torch.allclose(outputs(model2, batch)[1], out_sum[1])  # adapters read y: sum ≠ chain
    chained.detach()
    lin = [config("lora", sites=("*.q",)), config("bitfit", sites=("*.q",))]
    a, b = dc.attach(model, dc.sum(*lin)), dc.attach(model2, dc.chain(*lin))
    perturb(a)
    b.controller.load_state_dict(a.controller.state_dict())
    assert_outputs_close(outputs(model, batch), outputs(model2, batch), atol=1e-12)


def test_sum_refuses_memory_sites():
    with pytest.raises(ValueError, match="sum adds controls at output sites"):
        dc.attach(tiny_t5(), dc.sum(config("prefix"), config("lora")))


@pytest.mark.parametrize("method", METHODS)
def test_encoder_only_model(method):
    model = tiny_t5(encoder_only=True)
    batch = {k: v for k, v in tiny_batch().items() if k != "decoder_input_ids"}
    before = model(**batch).last_hidden_state
    delta = dc.attach(model, config(method).zero())
    torch.testing.assert_close(model(**batch).last_hidden_state, before, atol=1e-12, rtol=0)
    delta.detach()
