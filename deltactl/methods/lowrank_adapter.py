"""Low-rank adapter (Mahabadi et al., 2021, "Compacter", §3.3): a Houlsby bottleneck whose projections are
factorised, W = A Bᵀ of rank k (k = 1 in the paper),

    F ← F + U σ(D F),   D = A_D B_Dᵀ ∈ ℝ^{r×d},   U = A_U B_Uᵀ ∈ ℝ^{d×r},

with A_U = 0 at the start, so U = 0 and the control starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.backbones.compat import ACT2FN
from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class LowRankAdapterConfig(DeltaConfig):
    """Args: r bottleneck width; rank k of each projection; activation; sites branch patterns."""

    method: ClassVar[str] = "lowrank_adapter"
    small: ClassVar[dict] = {"r": 3, "rank": 2}
    sites: tuple[str, ...] = ("*.attn.out", "*.ffn.out")
    r: int = 64
    rank: int = 1
    activation: str = "relu"


class LowRankLinear(nn.Module):
    """x ↦ A (Bᵀ x) + b with A ∈ ℝ^{out×k}, B ∈ ℝ^{in×k}."""

    def __init__(self, d_in: int, d_out: int, rank: int, zero: bool):
        super().__init__()
        # Entries of A Bᵀ have std ≈ 1e-2·√k (Houlsby's init for the down projection); A = 0 for the up one.
        self.A = nn.Parameter(torch.zeros(d_out, rank) if zero else torch.randn(d_out, rank) * 0.1)
        self.B = nn.Parameter(torch.randn(d_in, rank) * 0.1)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return F.linear(x @ self.B, self.A, self.bias)


class LowRankAdapter(nn.Module):
    def __init__(self, d: int, cfg: LowRankAdapterConfig):
        super().__init__()
        if cfg.activation not in ACT2FN:
            raise ValueError(f"unknown activation {cfg.activation!r}; e.g. relu, gelu, gelu_new, silu")
        if cfg.rank < 1:
            raise ValueError(f"low-rank adapter rank must be ≥ 1, got {cfg.rank}")
        self.down = LowRankLinear(d, cfg.r, cfg.rank, zero=False)
        self.up = LowRankLinear(cfg.r, d, cfg.rank, zero=True)
        self.act = ACT2FN[cfg.activation]

    def forward(self, x, y):
        return (y + self.up(self.act(self.down(y.to(self.up.bias.dtype))))).to(y.dtype)


def build(cfg, backbone, sites):
    return PerSite(cfg, sites, {s.name: LowRankAdapter(s.dims["d"], cfg) for s in sites})


def count(cfg, sites):
    return sum(2 * cfg.rank * (s.dims["d"] + cfg.r) + s.dims["d"] + cfg.r for s in sites)


register(LowRankAdapterConfig, {"branch", "state"}, build, count)
