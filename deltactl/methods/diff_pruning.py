"""Diff pruning (Guo, Rush & Kim, 2021, "Parameter-efficient transfer learning with diff pruning"):
θ' = θ + z ⊙ w, with w dense and z a hard-concrete gate per entry (Louizos et al., 2018) whose expected
L0 norm is penalised, so training drives most of Δ = z ⊙ w to exact zeros.

    training: s = σ((log u − log(1−u) + log α)/β), u ~ U(0,1);   evaluation: s = σ(log α)
    z = clip(s (ζ − γ) + γ, 0, 1);   R(δ) = λ · mean P(z ≠ 0) = λ · mean σ(log α − β log(−γ/ζ))

w = 0 at the start, so the control starts as the identity. ``sparsity()`` reports the realised share of
non-zero entries of Δ (evaluation gates). The paper's final magnitude-pruning and re-training stage is not
part of the method here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deltactl.control.controller import PerSite, site_key
from deltactl.control.registry import DeltaConfig, register

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1  # the hard-concrete temperature and stretch of Louizos et al.


@dataclass(frozen=True)
class DiffPruningConfig(DeltaConfig):
    """Args: sites parameter patterns (default: every weight); l0 the penalty weight λ; init_log_alpha."""

    method: ClassVar[str] = "diff_pruning"
    sites: tuple[str, ...] = ("*",)
    l0: float = 0.5
    init_log_alpha: float = 3.0  # σ(3) ≈ 0.95: gates start open, w decides the update


class GatedDiff(nn.Module):
    def __init__(self, shape, cfg: DiffPruningConfig):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))
        self.log_alpha = nn.Parameter(torch.full(shape, float(cfg.init_log_alpha)))

    def gate(self, sample: bool | None = None):
        """z: sampled while training (or if ``sample``), the deterministic evaluation gate otherwise."""
        if self.training if sample is None else sample:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def diff(self, sample: bool | None = None):
        return self.gate(sample) * self.w

    def forward(self, theta):
        return (theta + self.diff()).to(theta.dtype)

    def weight_laws(self, site):
        return [(site.dims["param"], lambda theta: (theta + self.diff(sample=False)).to(theta.dtype))]


class DiffPruning(PerSite):
    def penalty(self):
        """λ · the expected share of non-zero gates."""
        shift = BETA * math.log(-GAMMA / ZETA)
        expected = sum(torch.sigmoid(layer.log_alpha - shift).sum() for layer in self.layers.values())
        return self.config.l0 * expected / sum(layer.w.numel() for layer in self.layers.values())

    @torch.no_grad()
    def sparsity(self) -> dict:
        """Non-zero entries of Δ = z ⊙ w with evaluation gates: {"nonzero", "total", "share"}."""
        nonzero = total = 0
        for site in self.sites:
            layer = self.layers[site_key(site.name)]
            nonzero += int((layer.diff(sample=False) != 0).sum())
            total += layer.w.numel()
        return {"nonzero": nonzero, "total": total, "share": nonzero / total}


def build(cfg, backbone, sites):
    return DiffPruning(cfg, sites, {s.name: GatedDiff(s.dims["shape"], cfg) for s in sites})


def count(cfg, sites):
    return 2 * sum(math.prod(s.dims["shape"]) for s in sites)


register(DiffPruningConfig, {"parameter"}, build, count)
