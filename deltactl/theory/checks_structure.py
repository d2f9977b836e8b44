"""Numerical checks of the structural statements: prefix as gated attention, LoRA, zero control, DID, tangents."""

from __future__ import annotations

import torch

import deltactl as dc
from deltactl.backbones import compat
from deltactl.control.controller import site_key
from deltactl.methods import make_config
from deltactl.theory import fixtures as fx
from deltactl.theory.geometry import tangent_dimension
from deltactl.theory.model import call_with, trainable_controls
from deltactl.theory.reachability import JacobianOperator, output_map, randomized_svd


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def prefix_is_gated_attention(site: str = "decoder.1.cross.kv", length: int = 5) -> tuple[float, str]:
    """He et al. (2022), eq. 7: attention with prefix rows = (1 − λ) · attention over the tokens + λ · attention over
    the prefix, λ(q) = Σᵢ exp(q·Pₖᵢ) / (Σᵢ exp(q·Pₖᵢ) + Σⱼ exp(q·Kⱼ)), per query and head; on t5-small (float32)."""
    model = fx.small_t5()
    batch = fx.t5_batch(vocab=32128, src=7, tgt=5)
    delta = dc.attach(model, make_config("prefix", sites=(site,), length=length, reparameterize=False))
    fx.perturb(delta.parameters(), scale=1.0)
    model.eval()
    attention = model.get_submodule(delta.backbone.sites[site].module)
    seen = {}

    def keep(module, args, kwargs, out):
        seen.update(compat.bind_call(module.forward, args, kwargs), out=out[0])

    handle = attention.register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    law = dict((s.name, law) for s, law in delta.controller.controls())[site]
    with torch.no_grad():
        h, e = seen["hidden_states"], seen["key_value_states"]
        b, t = h.shape[:2]
        heads, dk = attention.n_heads, attention.key_value_proj_dim
        split = lambda x: x.view(x.shape[0], x.shape[1], heads, dk).transpose(1, 2)  # noqa: E731
        q, k, v = split(attention.q(h)), split(attention.k(e)), split(attention.v(e))
        pk, pv = law(b)  # the controller's memory rows, (batch, heads, p, dk)
        scale = attention.scaling if attention.scaling is not None else dk**-0.5
        token_logits = q @ k.transpose(2, 3) * scale
        if seen.get("position_bias") is not None:
            token_logits = token_logits + seen["position_bias"][..., -k.shape[2]:]
        mask = seen.get("mask")
        if mask is not None:
            mask = mask[..., -k.shape[2]:]
            token_logits = token_logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
                else token_logits + mask
        prefix_logits = pk.new_zeros(0) if pk.shape[2] == 0 else q @ pk.transpose(2, 3) * scale
        z_tok, z_pre = torch.logsumexp(token_logits, -1), torch.logsumexp(prefix_logits, -1)
        lam = torch.sigmoid(z_pre - z_tok)[..., None]  # Σ exp(prefix) / (Σ exp(prefix) + Σ exp(tokens))
        mixed = (1 - lam) * (token_logits.softmax(-1) @ v) + lam * (prefix_logits.softmax(-1) @ pv)
        expected = attention.o(mixed.transpose(1, 2).reshape(b, t, heads * dk))
    err = _max_rel(seen["out"], expected)
    return err, f"{site}, {length} prefix rows, gate λ in [{lam.min():.3f}, {lam.max():.3f}], mean {lam.mean():.3f}"


def lora_rank_and_merge(r: int = 4) -> tuple[float, str]:
    """ΔW = (α/r) B A has rank ≤ r at every site, and W + ΔW without a delta gives the unmerged outputs (t5-small)."""
    model = fx.small_t5()
    batch = fx.t5_batch(vocab=32128, src=7, tgt=5)
    delta = dc.attach(model, make_config("lora", r=r, sites=("*.q", "*.v")))
    fx.perturb(delta.parameters(), scale=0.05)
    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
    sites, rank_err = 0, 0.0
    for site in delta.controller.sites:
        layer = delta.controller.layers[site_key(site.name)]  # LoRA's per-site A (r × d_in), B (d_out × r), scale
        s = torch.linalg.svdvals((layer.scale * layer.B @ layer.A).detach())
        rank_err = max(rank_err, (s[r] / s[0]).item())
        sites += 1
    with torch.no_grad():
        delta.merge()  # W ← W + (α/r) B A at every site, the delta's hooks removed
        merged = model(**batch).logits
    delta.detach()  # unmerges: the exact weights come back
    merge_err = _max_rel(merged, unmerged)
    return max(rank_err, merge_err), (f"{sites} sites, r = {r}: max σ_(r+1)/σ_1 = {rank_err:.1e}, "
                                      f"merged vs unmerged logits {merge_err:.1e}")


def zero_control_is_identity() -> tuple[float, str]:
    """For every registered method, its zero config leaves logits and encoder states unchanged (t5-small)."""
    model = fx.small_t5()
    batch = fx.t5_batch(vocab=32128, src=7, tgt=5)
    with torch.no_grad():
        out = model(**batch)
    worst, where = 0.0, ""
    for method in fx.registered_methods():
        delta = dc.attach(model, fx.default_config(method).zero())
        model.eval()
        with torch.no_grad():
            got = model(**batch)
        delta.detach()
        err = max(_max_rel(got.logits, out.logits), _max_rel(got.encoder_last_hidden_state,
                                                              out.encoder_last_hidden_state))
        if err >= worst:
            worst, where = err, method
    return worst, f"{len(fx.registered_methods())} methods ({', '.join(fx.registered_methods())}); worst {where}"


def did_reachable_set_is_affine(d: int = 3) -> tuple[float, str]:
    """DID, δ(z) = δ₀ + P z with a random dense P (D × d): the controls it reaches form an affine set of dimension
    rank P ≤ d, so the output Jacobian in z has rank ≤ d (tiny T5, float64, LoRA as the D-dimensional δ)."""
    model = fx.tiny_t5()
    batch = fx.t5_batch()
    delta = dc.attach(model, make_config("lora", r=2, sites=("*.q", "*.v", "*.o")))
    fx.perturb(delta.parameters(), scale=0.3)
    model.eval()
    base = trainable_controls(model)
    names = list(base)
    sizes = [base[n].numel() for n in names]
    D = sum(sizes)
    g = torch.Generator().manual_seed(0)
    P = torch.randn(D, d, generator=g, dtype=torch.float64) / D**0.5
    delta0 = torch.cat([base[n].reshape(-1) for n in names])

    def controls_of(z):
        flat = delta0 + P @ z
        return {n: part.reshape(base[n].shape) for n, part in zip(names, torch.split(flat, sizes))}

    # affinity: δ(z) − δ₀ lies in range(P), and δ(a z₁ + (1 − a) z₂) = a δ(z₁) + (1 − a) δ(z₂)
    zs = torch.randn(4, d, generator=g, dtype=torch.float64)
    flat = lambda z: torch.cat([v.reshape(-1) for v in controls_of(z).values()])  # noqa: E731
    a = 0.3
    affine = (flat(a * zs[0] + (1 - a) * zs[1]) - a * flat(zs[0]) - (1 - a) * flat(zs[1])).abs().max().item()
    diffs = torch.stack([flat(z) - delta0 for z in zs], 1)
    residual = (diffs - P @ torch.linalg.lstsq(P, diffs).solution).abs().max().item()
    logits = output_map(model, batch, lambda m, b: m(**b).logits)
    op_z = JacobianOperator(lambda c: logits(controls_of(c["z"])), {"z": torch.zeros(d, dtype=torch.float64)})
    rank_z = randomized_svd(op_z, d).rank
    op_full = JacobianOperator(logits, base)
    rank_full = randomized_svd(op_full, 4 * d, oversample=8).rank
    excess = max(0, rank_z - d) + (0 if rank_full > d else 1)  # the full δ must reach more than d directions
    err = max(affine, residual, float(excess))
    return err, (f"D = {D}, d = {d}: affinity {affine:.1e}, distance to range(P) {residual:.1e}, "
                 f"rank ∂logits/∂z = {rank_z} ≤ d, rank ∂logits/∂δ ≥ {rank_full}")


def lora_tangent_dimension(r: int = 2, site: str = "encoder.0.attn.q", probes: int = 40) -> tuple[float, str]:
    """LoRA's tangent space at one site has dimension r (d_in + d_out) − r² < r (d_in + d_out) parameters
    (the GL(r) symmetry B A = (B M)(M⁻¹ A)); tiny T5, float64, outputs of the law on random probe rows."""
    model = fx.tiny_t5()
    delta = dc.attach(model, make_config("lora", r=r, sites=(site,)))
    fx.perturb(delta.parameters(), scale=0.5)
    model.eval()
    s = delta.backbone.sites[site]
    d_in, d_out = s.dims["in"], s.dims["out"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(probes, d_in, generator=g, dtype=torch.float64)
    y = torch.zeros(probes, d_out, dtype=torch.float64)
    law = dict((t.name, law) for t, law in delta.controller.controls())[site]
    rank, n = tangent_dimension(lambda c: call_with(model, c, law, x, y), trainable_controls(model))
    expected = r * (d_in + d_out) - r * r
    return float(abs(rank - expected)), f"{site}: tangent dimension {rank}, expected {expected}, parameters {n}"
