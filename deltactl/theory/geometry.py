"""Subspace geometry of delta methods: effective weight updates, principal angles, tangent-space dimensions.

- Effective update at a site: the linear part of what the control law adds, ΔW_x = ∂(G(x, y) − y)/∂x and
  ΔW_y = ∂(G(x, y) − y)/∂y, averaged over the rows (tokens) the site sees. LoRA gives ΔW_x = (α/r) B A exactly
  (rank ≤ r); a sequential adapter y + U σ(D y + b) + c gives its linearisation ΔW_y = U diag(σ'(D y + b)) D;
  BitFit gives zero (it shifts, it does not rotate).
- Principal angles between the column spaces of two updates (two methods, or one method on two tasks):
  θ_i = arccos σ_i(U_Aᵀ U_B), with U_A, U_B orthonormal bases of the numerical ranges (Björck & Golub, "Numerical
  methods for computing angles between linear subspaces", Math. Comp. 1973).
- Tangent dimension: the rank of ∂F/∂δ for a map F of δ (the law's outputs on probe rows, or the model's
  outputs) — the dimension of the set of functions the method reaches near δ, against its parameter count.
  LoRA's factorisation has the symmetry (B, A) → (B M, M⁻¹ A), so at a generic point its tangent space at one
  site has dimension r (d_in + d_out) − r², not r (d_in + d_out).
"""

from __future__ import annotations

import torch
from torch.func import jacrev, vmap

from deltactl.backbones import backbone_for
from deltactl.control.attach import Delta
from deltactl.theory.reachability import JacobianOperator, default_rtol, numerical_rank, randomized_svd
from deltactl.theory.system import Controls


def site_law(delta: Delta, site: str):
    """The control law ``G(x, y)`` the delta runs at an output-kind site."""
    laws = {s.name: (s, law) for s, law in delta.controller.controls()}
    if site not in laws:
        raise ValueError(f"delta {delta.name!r} does not act at {site!r}; it acts at {', '.join(laws)}")
    kind = laws[site][0].kind
    if kind not in ("linear", "norm", "branch", "state"):
        raise ValueError(f"{site!r} is a {kind} site: effective updates are defined at linear, norm, branch, "
                         "state sites (the law maps (x, y) to y')")
    law = laws[site][1]
    if getattr(law, "acts_on", "output") != "output":  # x' = G(x) before the layer: G(x, y) − y means nothing
        raise ValueError(f"the law of delta {delta.name!r} at {site!r} acts on the layer's input (x' = G(x)), not "
                         "on its output; effective updates are defined for laws y' = G(x, y)")
    return law


def site_io(model, batch: dict, site: str, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) the law at ``site`` receives in one forward pass, as (rows, d_in), (rows, d_out) tensors.

    ``forward(model, batch)`` runs the model (default ``model(**batch)``). Recorded before any controller acts.
    """
    backbone = backbone_for(model)
    if site not in backbone.sites:
        raise ValueError(f"no site {site!r} on this {backbone.family} model")
    s = backbone.sites[site]
    kept = {}
    if backbone.family == "bert" and s.kind == "branch":  # the law reads the sub-layer input kept as input_tensor
        parent = model.get_submodule(s.module.rsplit(".", 1)[0])
        h1 = parent.register_forward_pre_hook(
            lambda m, a, k: kept.__setitem__("x", a[1] if len(a) > 1 else k["input_tensor"]), with_kwargs=True)
        h2 = backbone.module(s).register_forward_hook(lambda m, a, o: kept.__setitem__("y", o), prepend=True)
        handles = [h1, h2]
    else:
        def keep(m, a, o):
            kept["x"], kept["y"] = (a[0] if a else None), (o[0] if isinstance(o, tuple) else o)
        handles = [backbone.module(s).register_forward_hook(keep, prepend=True)]
    try:
        with torch.no_grad():
            (forward or (lambda m, b: m(**b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
    x, y = kept["x"], kept["y"]
    return x.reshape(-1, x.shape[-1]).detach(), y.reshape(-1, y.shape[-1]).detach()


def effective_update(law, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔW_x, ΔW_y): row-averaged Jacobians of G(x, y) − y in x (d_out × d_in) and in y (d_out × d_out)."""
    def deviation(xr, yr):
        return law(xr[None], yr[None])[0] - yr

    jx, jy = vmap(jacrev(deviation, argnums=(0, 1)))(x, y)
    return jx.mean(0).detach(), jy.mean(0).detach()


def column_basis(M: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis (columns) of the numerical range of M."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    rank = numerical_rank(S, default_rtol(M.dtype) if rtol is None else rtol)
    return U[:, :rank]


def principal_angles(A: torch.Tensor, B: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of A and B (same number of rows)."""
    if A.shape[0] != B.shape[0]:
        raise ValueError(f"principal angles need matrices with the same number of rows; got {A.shape} and {B.shape}")
    Ua, Ub = column_basis(A, rtol), column_basis(B, rtol)
    if Ua.shape[1] == 0 or Ub.shape[1] == 0:
        return torch.zeros(0, dtype=A.dtype, device=A.device)
    cos = torch.linalg.svdvals(Ua.T @ Ub).clamp(0.0, 1.0)
    return torch.arccos(cos).sort().values


def acting_controls(fn, controls: Controls, seed: int = 0) -> Controls:
    """The tensors of δ that move ``fn`` at all (non-zero gradient of ⟨u, fn⟩ for a random u)."""
    from torch.func import vjp

    out, pull = vjp(fn, controls)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(out.shape, generator=g, dtype=out.dtype, device="cpu").to(out.device)  # the same u on any device
    grads = pull(u)[0]
    return {k: v for k, v in controls.items() if grads[k].abs().max() > 0}


def tangent_dimension(fn, controls: Controls, rtol: float | None = None) -> tuple[int, int]:
    """(rank of ∂fn/∂δ, number of δ parameters that move fn): the reached dimension against the cost."""
    acting = acting_controls(fn, controls)
    if not acting:
        return 0, 0
    op = JacobianOperator(lambda c: fn({**controls, **c}), acting)
    n_params = op.shape[1]
    spec = randomized_svd(op, min(op.shape), rtol=rtol)
    return spec.rank, n_params
