"""VeRA (Kopiczko et al., 2024): y = W x + Λ_b B Λ_d A x with A ∈ ℝ^{r×in}, B ∈ ℝ^{out×r} frozen, random and shared
by every site, and trainable diagonals b ∈ ℝ^out (0 at the start) and d ∈ ℝ^r (d_initial).

As PEFT's VeRA: one A of r × (largest in) and one B of (largest out) × r, drawn in that order from a
``torch.Generator`` seeded with ``seed`` (PEFT's ``projection_prng_key``) by PEFT's Kaiming-uniform (bound √(6/fan_in),
in float32); each site uses A's first ``in`` columns and B's first ``out`` rows. The projections are saved with δ
(PEFT's ``save_projection``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.control.controller import Controller, site_key
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class VeRAConfig(DeltaConfig):
    """Args: r rank of the shared projections; d_initial the start of d; seed of the projections; dropout on the
    input; sites linear patterns."""

    method: ClassVar[str] = "vera"
    small: ClassVar[dict] = {"r": 4}
    sites: tuple[str, ...] = ("*.q", "*.v")
    r: int = 256
    d_initial: float = 0.1
    seed: int = 0
    dropout: float = 0.0


def kaiming_uniform(shape, generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(−√3·√2/√fan_in, +…) with fan_in = shape[1], float32."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRA(Controller):
    def __init__(self, cfg: VeRAConfig, sites, modules: dict):
        super().__init__(cfg, sites)
        d_in, d_out = max(s.dims["in"] for s in sites), max(s.dims["out"] for s in sites)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("A", kaiming_uniform((cfg.r, d_in), generator))
        self.register_buffer("B", kaiming_uniform((d_out, cfg.r), generator))
        self.b = nn.ParameterDict({site_key(s.name): nn.Parameter(torch.zeros(s.dims["out"])) for s in sites})
        self.d = nn.ParameterDict({site_key(s.name): nn.Parameter(torch.full((cfg.r,), cfg.d_initial)) for s in sites})
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._dims = {s.name: (s.dims["in"], s.dims["out"]) for s in sites}

    def update(self, site: str) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A at ``site``."""
        d_in, d_out = self._dims[site]
        key = site_key(site)
        return (self.b[key][:, None] * self.B[:d_out]) @ (self.d[key][:, None] * self.A[:, :d_in])

    def control(self, site, x, y):
        d_in, d_out = self._dims[site]
        key = site_key(site)
        x = self.dropout(x.to(self.A.dtype))
        return (y + self.b[key] * F.linear(self.d[key] * F.linear(x, self.A[:, :d_in]), self.B[:d_out])).to(y.dtype)

    def weight_laws(self):
        return [(s, "weight", lambda W, name=s.name: W + self.update(name)) for s in self.sites]


def build(cfg, backbone, sites):
    if cfg.r < 1:
        raise ValueError(f"VeRA rank r must be ≥ 1, got {cfg.r}")
    return VeRA(cfg, sites, {s.name: backbone.module(s) for s in sites})


def count(cfg, sites):
    return sum(s.dims["out"] + cfg.r for s in sites)


register(VeRAConfig, {"linear"}, build, count)
