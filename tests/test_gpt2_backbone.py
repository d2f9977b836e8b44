"""GPT-2's backbone: the fused q/k/v projection as slices, laws translated to Conv1D storage, and what it refuses."""

import pytest
import torch
from conftest import causal_labels, tiny_causal_batch, tiny_gpt2
from test_conformance import perturb

import deltactl as dc


def test_slices_act_on_their_own_columns_of_c_attn():
    model = tiny_gpt2()
    batch = tiny_causal_batch()
    kept = []
    c_attn = model.transformer.h[0].attn.c_attn
    for attached in (False, True):
        if attached:
            delta = dc.attach(model, "bitfit", sites=("decoder.0.attn.k",))
            with torch.no_grad():
                delta.controller.layers["decoder__0__attn__k"].bias.fill_(1.0)
        handle = c_attn.register_forward_hook(lambda m, a, o: kept.append(o.detach()))  # after the law's hook
        model(**batch)
        handle.remove()
    base = kept[0]
    d = model.config.n_embd
    change = kept[1] - base
    assert torch.equal(change[..., :d], torch.zeros_like(change[..., :d]))
    assert torch.equal(change[..., 2 * d :], torch.zeros_like(change[..., :d]))
    torch.testing.assert_close(change[..., d : 2 * d], torch.ones_like(change[..., :d]), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("method", "sites"), [("lora", ("*.q", "*.v", "*.o", "*.wi", "*.wo", "*.qkv")),
                                               ("ia3", ("*.k", "*.v", "*.o", "*.ffn.wo")),
                                               ("bitfit", ("*.q", "*.k", "*.qkv", "*.o", "*.wi", "*.wo"))])
def test_weight_target_writes_each_law_into_conv1d_storage(method, sites):
    """Merging through GPT2Backbone.weight_target (θ ← law'(θ) on the stored Conv1D weights) equals the delta."""
    model = tiny_gpt2()
    batch = {**tiny_causal_batch(), "labels": causal_labels(tiny_causal_batch())}
    delta = dc.attach(model, method, sites=sites)
    perturb(delta, scale=0.1)
    with torch.no_grad():
        expected = model(**batch).logits
        writes = [delta.backbone.weight_target(site, attribute, law)
                  for site, attribute, law in delta.controller.weight_laws()]
        delta.disable()
        saved = []
        for module, attribute, law in writes:
            old = module._parameters[attribute]
            saved.append((old, old.clone()))
            old.copy_(law(old))
        merged = model(**batch).logits
        for old, copy in saved:
            old.copy_(copy)
    torch.testing.assert_close(merged, expected, atol=1e-12, rtol=0)


def test_refusals_name_the_reason():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="slice of the fused projection decoder.0.attn.qkv"):
        dc.attach(model, "ia3", sites=("decoder.0.attn.q",), feedforward=("decoder.0.attn.q",))
    assert not hasattr(model, "deltactl")
    with pytest.raises(ValueError, match="reorder_and_upcast_attn=False"):
        dc.attach(tiny_gpt2(reorder_and_upcast_attn=True), "prefix", length=2, mid_dim=4)
    with pytest.raises(ValueError, match="add_cross_attention=False"):
        dc.attach(tiny_gpt2(add_cross_attention=True), "lora")


def test_bare_gpt2model_and_tied_embedding():
    model = tiny_gpt2(head=False)
    batch = tiny_causal_batch()
    before = model(**batch).last_hidden_state
    delta = dc.attach(model, "prompt", length=2)
    assert model(**batch).last_hidden_state.shape[1] == batch["input_ids"].shape[1] + 2
    delta.detach()
    torch.testing.assert_close(model(**batch).last_hidden_state, before, atol=0, rtol=0)
    lm = tiny_gpt2()
    site = dc.backbone_for(lm).sites["transformer.wte.weight"]
    assert {path for path, _ in site.dims["owners"]} == {"transformer.wte", "lm_head"}  # the tied LM head too
