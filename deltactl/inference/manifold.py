"""Canonical manifolds of correct activations (Yang & Liu, ICLR 2022, §3.2): per layer, an affine subspace by PCA.

Let H⁽ʲ⁾ ∈ ℝ^{n×d} hold the layer-j activations at the output position of the n correctly classified training
examples, μ⁽ʲ⁾ their mean. With the thin SVD H⁽ʲ⁾ − 1μ⁽ʲ⁾ᵀ = U Σ Vᵀ (σ₁ ≥ σ₂ ≥ …), keep the smallest k with

    (σ₁ + … + σ_k) / (σ₁ + … + σ_r) ≥ 0.99,

and project with Q⁽ʲ⁾ = V_k V_kᵀ (symmetric, idempotent: an orthogonal projector of rank k). The manifold is
M⁽ʲ⁾ = {μ⁽ʲ⁾ + x Q⁽ʲ⁾}; an activation's distance to it is ‖(h − μ)(I − Q)‖.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Subspace:
    """One layer's manifold: the mean μ (d,), the kept directions V_k (d, k) and all singular values."""

    mean: torch.Tensor
    basis: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def projector(self) -> torch.Tensor:
        """Q = V_k V_kᵀ."""
        return self.basis @ self.basis.T

    def residual(self, h: torch.Tensor, center: torch.Tensor | None) -> torch.Tensor:
        """(h − c)(I − Q) = (h − c) − ((h − c) V_k) V_kᵀ, without forming the d × d matrix."""
        x = h if center is None else h - center
        basis = self.basis.to(x.dtype)
        return x - (x @ basis) @ basis.T


def canonical_subspace(activations: torch.Tensor, threshold: float = 0.99) -> Subspace:
    """The PCA subspace of ``activations`` (n, d) keeping a ``threshold`` share of the singular-value sum.

    The SVD runs in float64; the result is in the activations' dtype.
    """
    if activations.ndim != 2 or activations.shape[0] < 2:
        raise ValueError(f"need activations of shape (n ≥ 2, d), got {tuple(activations.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    h = activations.detach().double()
    mean = h.mean(0)
    _, sigma, vh = torch.linalg.svd(h - mean, full_matrices=False)
    share = sigma.cumsum(0) / sigma.sum()
    # The smallest k reaching the share; the clamp guards against the last cumulative share rounding below 1.
    k = min(int((share < threshold - 1e-12).sum().item()) + 1, sigma.numel())
    dtype = activations.dtype
    return Subspace(mean.to(dtype), vh[:k].T.contiguous().to(dtype), sigma.to(dtype))


def pool(state: torch.Tensor, attention_mask: torch.Tensor | None, readout: str = "mean") -> torch.Tensor:
    """The activation at the "output position" of each example: (batch, T, d) → (batch, d).

    ``mean``: the mean over real tokens, the vector deltactl's sequence classifier feeds its head at the top
    layer; ``first``: the first token ([CLS]); ``last``: the last real token, where a causal LM such as GPT-2 reads
    its answer (the robust-prefix paper's [ANS] position).
    """
    if readout == "first":
        return state[:, 0]
    if readout == "last":
        if attention_mask is None:
            return state[:, -1]
        mask = attention_mask[:, -state.shape[1]:]
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # the last real position of each row, padding either side
        return state[torch.arange(state.shape[0], device=state.device), last]
    if readout != "mean":
        raise ValueError(f"readout must be 'mean', 'first' or 'last', got {readout!r}")
    if attention_mask is None:
        return state.mean(1)
    mask = attention_mask[:, -state.shape[1]:].unsqueeze(-1).to(state.dtype)
    return (state * mask).sum(1) / mask.sum(1).clamp(min=1)
