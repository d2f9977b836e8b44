"""Merge on weights with real, non-zero biases: the pre-trained MiniLM, and random fixtures whose biases are filled.

Random-init BERT starts with every bias at zero, where "replace the bias by δ" and "add δ to it" agree; these
weights tell the two apart.
"""

import pytest
import torch
from conftest import mergeable, tiny_bert, tiny_bert_batch

import deltactl as dc
from deltactl.methods import REGISTRY, make_example


def _perturb(delta, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.mark.parametrize("method", ["bitfit", "lora", "ia3"])
def test_merge_on_pretrained_minilm_equals_unmerged(minilm, method):
    """Merged and unmerged outputs agree to 1e-5 in float32 on MiniLM's real weights and biases."""
    model, batch = minilm
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert sum(b.abs().max().item() > 1e-2 for b in biases) >= 0.8 * len(biases)  # real biases, not zeros
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(**batch).last_hidden_state
    delta = dc.attach(model, method)
    _perturb(delta, scale=0.05)
    try:
        with torch.no_grad():
            unmerged = model(**batch).last_hidden_state
            delta.merge()
            merged = model(**batch).last_hidden_state
            delta.unmerge()
            again = model(**batch).last_hidden_state
    finally:
        delta.detach()
    assert (unmerged - base).abs().max() > 1e-2  # δ does something
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert torch.equal(again, unmerged)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_bitfit_merge_adds_to_the_pretrained_bias(minilm):
    """After merging, each bias is b₀ + δ (a float32 hand computation), not δ."""
    model, _ = minilm
    delta = dc.attach(model, "bitfit", sites=("*.q", "*.ln"))
    _perturb(delta)
    try:
        expected = {}
        for site in delta.controller.sites:
            module = model.get_submodule(site.module)
            expected[site.module] = module.bias.detach().clone() + delta.controller.layers[
                site.name.replace(".", "__")].bias.detach()
        delta.merge()
        for name, value in expected.items():
            torch.testing.assert_close(model.get_submodule(name).bias.detach(), value, atol=0, rtol=0)
    finally:
        delta.detach()


def _bert_with_biases(seed=0):
    """The tiny BERT with every bias and LayerNorm weight filled with random values (random init leaves them 0/1)."""
    model = tiny_bert(seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.copy_(p + torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_merge_with_nonzero_biases_equals_unmerged(method):
    """Every mergeable method, on a float64 tiny BERT with non-zero biases: merged = unmerged to 1e-10."""
    model, batch = _bert_with_biases(), tiny_bert_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    delta = dc.attach(model, make_example(method))
    if not mergeable(delta):
        pytest.skip(f"{method} is not a change of weights")
    _perturb(delta, scale=0.3)
    with torch.no_grad():
        unmerged = model(**batch).logits, model.bert(**batch).last_hidden_state
        delta.merge()
        merged = model(**batch).logits, model.bert(**batch).last_hidden_state
        delta.unmerge()
    for a, b in zip(merged, unmerged):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    delta.detach()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
