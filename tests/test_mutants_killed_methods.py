"""Control laws of the methods against float64 hand computations and the unwrapped model.

Each test names the wrong implementation it rules out; ``tools/mutants.py`` plants those bugs and expects these
tests to fail on them.
"""

import copy

import torch
from conftest import tiny_batch, tiny_t5
from test_conformance import perturb

import deltactl as dc
from deltactl.control.controller import site_key


def _site_io(model, module_name, batch):
    """(input, output) of one module in a forward pass of ``model``."""
    kept = {}
    handle = model.get_submodule(module_name).register_forward_hook(
        lambda m, a, o: kept.update(x=a[0].detach(), y=o.detach()))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return kept["x"], kept["y"]


# ---- per-site laws: control(site, x, y) ---------------------------------------------------------------------------


def test_per_site_control_maps_input_and_output_as_the_hooked_law():
    """At a linear site the law is y' = G(x, y) with x the layer's input and y its output. LoRA:
    G(x, y) = y + (α/r) B A x; a sequential adapter at a branch: G(h, y) = y + U relu(D y + b) + c.
    ``control(site, x, y)`` must give these (float64 by hand) and what the hook computes inside the model (the
    module's output there, on the unwrapped model's (x, y)). Rules out a per-site law that is handed only part of its
    payload (loses y)."""
    model = tiny_t5()
    ref = copy.deepcopy(model)
    batch = tiny_batch()
    lora_site, adapter_site = "encoder.0.attn.q", "encoder.1.ffn.out"
    lora = dc.attach(model, "lora", r=2, alpha=6.0, sites=(lora_site,))
    adapter = dc.attach(model, "adapter", r=3, sites=(adapter_site,))
    perturb(lora, seed=1, scale=0.5)
    perturb(adapter, seed=2, scale=0.5)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)  # q: d_model 16 → heads · d_kv = 8
    y = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    layer = lora.controller.layers[site_key(lora_site)]
    expected = y + (6.0 / 2) * x @ layer.A.detach().T @ layer.B.detach().T
    torch.testing.assert_close(lora.controller.control(lora_site, x, y), expected, atol=1e-14, rtol=0)

    h, u = torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 5, 16, generator=g,
                                                                               dtype=torch.float64)
    net = adapter.controller.layers[site_key(adapter_site)]
    hidden = torch.relu(u @ net.down.weight.detach().T + net.down.bias.detach())
    expected = u + hidden @ net.up.weight.detach().T + net.up.bias.detach()
    torch.testing.assert_close(adapter.controller.control(adapter_site, h, u), expected, atol=1e-14, rtol=0)

    # inside the model: the q projection's output is control(site, x, W_q x) on the unwrapped model's input
    module = lora.backbone.sites[lora_site].module
    x_ref, y_ref = _site_io(ref, module, batch)
    _, y_controlled = _site_io(model, module, batch)
    with torch.no_grad():
        torch.testing.assert_close(y_controlled, lora.controller.control(lora_site, x_ref, y_ref), atol=1e-14, rtol=0)
    assert (y_controlled - y_ref).abs().max() > 1e-3


# ---- IA3 ----------------------------------------------------------------------------------------------------------


def test_ia3_scales_keys_at_the_output_and_the_ffn_activations_at_wo_input():
    """IA3: k ← l_k ⊙ k at the key projection's output; FFN(x) = W_o (l_ff ⊙ a) at the input a of ``ffn.wo``, so
    G(x, y) = y ⊙ l at an output site and x ⊙ l at an input site (whatever output y a caller passes with it: the
    scaling sits before W_o). Checked by hand in float64 and, inside the model, against the unwrapped wo applied to
    l ⊙ a (the key scaling sits in layer 1, so layer 0's FFN input is the unwrapped model's). Rules out an
    input-site law that scales the output y when one is passed."""
    model = tiny_t5()
    ref = copy.deepcopy(model)
    batch = tiny_batch()
    delta = dc.attach(model, "ia3", sites=("encoder.1.attn.k", "encoder.0.ffn.wo"), feedforward=("*.ffn.wo",))
    perturb(delta, seed=4, scale=0.5)
    l_k = delta.controller.layers[site_key("encoder.1.attn.k")].l.detach()
    l_ff = delta.controller.layers[site_key("encoder.0.ffn.wo")].l.detach()
    assert l_k.shape == (8,) and l_ff.shape == (24,)  # heads · d_kv and d_ff

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 5, 16, generator=g, dtype=torch.float64), torch.randn(2, 5, 8, generator=g,
                                                                               dtype=torch.float64)
    torch.testing.assert_close(delta.controller.control("encoder.1.attn.k", x, y), y * l_k, atol=0, rtol=0)
    a, out = torch.randn(2, 5, 24, generator=g, dtype=torch.float64), torch.randn(2, 5, 16, generator=g,
                                                                                 dtype=torch.float64)
    torch.testing.assert_close(delta.controller.control("encoder.0.ffn.wo", a), a * l_ff, atol=0, rtol=0)
    torch.testing.assert_close(delta.controller.control("encoder.0.ffn.wo", a, out), a * l_ff, atol=0, rtol=0)

    wo = "encoder.block.0.layer.1.DenseReluDense.wo"
    a_ref, y_ref = _site_io(ref, wo, batch)
    _, y_controlled = _site_io(model, wo, batch)
    expected = (a_ref * l_ff) @ ref.get_submodule(wo).weight.detach().T  # T5's wo has no bias
    torch.testing.assert_close(y_controlled, expected, atol=1e-13, rtol=0)
    assert (y_controlled - y_ref).abs().max() > 1e-3


# ---- prefix -------------------------------------------------------------------------------------------------------


def test_prefix_row_is_keys_then_values_head_by_head():
    """A prefix row of width 2 · heads · d_kv is [k | v], each of k and v heads blocks of d_kv (PEFT's layout, the
    one import_peft writes): keys[b, h, i] = row_i[h·d_kv : (h+1)·d_kv], values[b, h, i] = row_i[H·d_kv + h·d_kv : …].
    Rules out rows split into heads first and keys/values second."""
    model = tiny_t5(d_kv=6, num_heads=3)
    site = "encoder.1.attn.kv"
    delta = dc.attach(model, "prefix", length=4, reparameterize=False, sites=(site,))
    heads, d_kv, p = 3, 6, 4
    rows = torch.arange(p * 2 * heads * d_kv, dtype=torch.float64).view(p, 2 * heads * d_kv)
    with torch.no_grad():
        delta.controller.rows[site_key(site)].copy_(rows)
    keys, values = delta.controller.control(site, 2)
    assert keys.shape == values.shape == (2, heads, p, d_kv)
    for b in range(2):
        for h in range(heads):
            for i in range(p):
                assert torch.equal(keys[b, h, i], rows[i, h * d_kv:(h + 1) * d_kv])
                assert torch.equal(values[b, h, i], rows[i, (heads + h) * d_kv:(heads + h + 1) * d_kv])
