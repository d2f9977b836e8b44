"""Compacter (Mahabadi et al., 2021, "Compacter: efficient low-rank hypercomplex adapter layers"): a Houlsby
bottleneck whose projections are parameterised hypercomplex multiplication (PHM) layers,

    W = Σᵢ₌₁ⁿ Aᵢ ⊗ Bᵢ,   Aᵢ ∈ ℝ^{n×n} shared by every adapter,   Bᵢ = sᵢ tᵢᵀ of rank k, per layer,

so a d→r projection costs k(d + r) parameters plus the shared n³. The up projection's tᵢ start at 0, so the
control starts as the identity. n must divide d and r.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.backbones.compat import ACT2FN
from deltactl.control.controller import Controller, site_key
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class CompacterConfig(DeltaConfig):
    """Args: r bottleneck width; n PHM dimension (number of Kronecker terms); rank k of each Bᵢ; activation."""

    method: ClassVar[str] = "compacter"
    small: ClassVar[dict] = {"r": 4, "n": 2, "rank": 2}
    sites: tuple[str, ...] = ("*.attn.out", "*.ffn.out")
    r: int = 64
    n: int = 4
    rank: int = 1
    activation: str = "gelu_new"


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Σᵢ Aᵢ ⊗ (sᵢ tᵢᵀ): rule (n, n, n), s (n, out/n, k), t (n, in/n, k) → (out, in)."""
    n, (_, p, _), (_, q, _) = rule.shape[0], s.shape, t.shape
    blocks = s @ t.transpose(1, 2)  # Bᵢ, (n, p, q)
    return torch.einsum("iac,ibd->abcd", rule, blocks).reshape(n * p, n * q)


class PHMLinear(nn.Module):
    """x ↦ W x + b with W = Σᵢ Aᵢ ⊗ sᵢ tᵢᵀ; the rule A is passed in (it is shared)."""

    def __init__(self, d_in: int, d_out: int, cfg: CompacterConfig, zero: bool):
        super().__init__()
        n, k = cfg.n, cfg.rank
        # With Aᵢ ~ N(0, 1/n), entries of W have variance k·σ⁴; σ = 0.1 gives std 1e-2·√k, Houlsby's init.
        self.s = nn.Parameter(torch.randn(n, d_out // n, k) * 0.1)
        self.t = nn.Parameter(torch.zeros(n, d_in // n, k) if zero else torch.randn(n, d_in // n, k) * 0.1)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x, rule):
        return F.linear(x, phm_weight(rule, self.s, self.t), self.bias)


class CompacterAdapter(nn.Module):
    def __init__(self, d: int, cfg: CompacterConfig):
        super().__init__()
        self.down = PHMLinear(d, cfg.r, cfg, zero=False)
        self.up = PHMLinear(cfg.r, d, cfg, zero=True)
        self.act = ACT2FN[cfg.activation]

    def forward(self, y, rule_down, rule_up):
        return (y + self.up(self.act(self.down(y.to(rule_up.dtype), rule_down)), rule_up)).to(y.dtype)


class Compacter(Controller):
    """The per-site PHM adapters and the two shared rules (one for down-, one for up-projections)."""

    def __init__(self, cfg: CompacterConfig, sites):
        super().__init__(cfg, sites)
        n = cfg.n
        self.rule_down = nn.Parameter(torch.randn(n, n, n) / n**0.5)
        self.rule_up = nn.Parameter(torch.randn(n, n, n) / n**0.5)
        self.layers = nn.ModuleDict({site_key(s.name): CompacterAdapter(s.dims["d"], cfg) for s in sites})

    def control(self, site, x, y):
        return self.layers[site_key(site)](y, self.rule_down, self.rule_up)


def build(cfg, backbone, sites):
    if cfg.activation not in ACT2FN:
        raise ValueError(f"unknown activation {cfg.activation!r}; e.g. relu, gelu, gelu_new, silu")
    if cfg.n < 1 or cfg.rank < 1:
        raise ValueError(f"Compacter needs n ≥ 1 and rank ≥ 1, got n={cfg.n}, rank={cfg.rank}")
    for s in sites:
        if s.dims["d"] % cfg.n or cfg.r % cfg.n:
            raise ValueError(
                f"Compacter's n={cfg.n} must divide the width d={s.dims['d']} at {s.name!r} and r={cfg.r}; "
                f"pick n among the common divisors, e.g. {[k for k in (1, 2, 4, 8) if not s.dims['d'] % k]}"
            )
    return Compacter(cfg, sites)


def count(cfg, sites):
    return 2 * cfg.n**3 + sum(2 * cfg.rank * (s.dims["d"] + cfg.r) + s.dims["d"] + cfg.r for s in sites)


register(CompacterConfig, {"branch", "state"}, build, count)
