"""Property tests: the contracts hold across T5 shapes, ranks, widths and prefix/prompt lengths."""

import torch
from conftest import tiny_batch, tiny_t5
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import deltactl as dc
from deltactl.control.accounting import closed_form

t5_shapes = st.fixed_dictionaries(
    {
        "d_model": st.sampled_from([8, 12, 16]),
        "d_kv": st.integers(2, 6),
        "num_heads": st.integers(1, 3),
        "d_ff": st.integers(4, 24),
        "num_layers": st.integers(1, 3),
        "feed_forward_proj": st.sampled_from(["relu", "gated-gelu"]),
    }
)

method_configs = st.one_of(
    st.builds(dc.LoRAConfig, r=st.integers(1, 6), alpha=st.floats(0.5, 32),
              sites=st.sampled_from([("*.q", "*.v"), ("*.o",), ("*.ffn.w*",), ("decoder.*.cross.k",)])),
    st.builds(dc.AdapterConfig, r=st.integers(1, 8),
              sites=st.sampled_from([("*.attn.out", "*.ffn.out"), ("*.cross.out",), ("encoder.*.out",)])),
    st.builds(dc.BitFitConfig, sites=st.sampled_from([("*.ln",), ("*.wo", "*.q"), ("*.final_ln",)])),
    st.builds(dc.PrefixConfig, length=st.integers(1, 5), reparameterize=st.booleans(), mid_dim=st.integers(1, 8),
              sites=st.sampled_from([("*.kv",), ("decoder.*.cross.kv",), ("encoder.0.attn.kv",)])),
    st.builds(dc.PromptConfig, length=st.integers(1, 6), init=st.sampled_from(["vocab", "random"])),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=t5_shapes, cfg=method_configs, seed=st.integers(0, 3))
def test_contracts_across_shapes(shape, cfg, seed):
    model = tiny_t5(seed=seed, num_decoder_layers=shape["num_layers"], **shape)
    batch = tiny_batch(seed=seed)
    before = model(**batch).logits

    zero = dc.attach(model, cfg.zero())
    torch.testing.assert_close(model(**batch).logits, before, atol=1e-12, rtol=0)
    zero.detach()

    delta = dc.attach(model, cfg)
    assert delta.num_parameters() == closed_form(cfg, delta.backbone)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1)
    controlled = model(**batch).logits
    assert torch.isfinite(controlled).all() and controlled.shape == before.shape
    assert (controlled - before).abs().max() > 1e-8  # δ ≠ 0 acts at every site pattern drawn (cross-attention too)
    if isinstance(cfg, dc.LoRAConfig):
        # The merged weights are W + (α/r) B A by hand, and give the unmerged outputs: a second path to the same map.
        weights = {s.module: model.get_submodule(s.module).weight.detach().clone() for s in delta.controller.sites}
        with torch.no_grad():
            delta.merge()
            for site in delta.controller.sites:
                layer = delta.controller.layers[site.name.replace(".", "__")]
                expected = weights[site.module] + (cfg.alpha / cfg.r) * layer.B @ layer.A
                torch.testing.assert_close(model.get_submodule(site.module).weight, expected, atol=1e-12, rtol=0)
            torch.testing.assert_close(model(**batch).logits, controlled, atol=1e-10, rtol=0)
            delta.unmerge()
    delta.detach()
    assert torch.equal(model(**batch).logits, before)
    assert not any(p.requires_grad is False for p in model.parameters())
