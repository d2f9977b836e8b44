"""Prefix-tuning (Li & Liang, 2021): trainable key/value rows in attention memories.

Attention with a prefix (Kₚ, Vₚ) of p rows is softmax(q [Kₚ; K]ᵀ + b) [Vₚ; V]. With ``reparameterize`` the rows
come from an MLP over a p × d embedding (Kₚ, Vₚ = W₂ tanh(W₁ E + b₁) + b₂, sliced per site), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.control.controller import Controller, site_key
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class PrefixConfig(DeltaConfig):
    """Args: length p rows per memory; reparameterize through an MLP of width mid_dim; sites memory patterns."""

    method: ClassVar[str] = "prefix"
    small: ClassVar[dict] = {"length": 2, "mid_dim": 6}
    sites: tuple[str, ...] = ("*.kv",)
    length: int = 20
    reparameterize: bool = True
    mid_dim: int = 512

    def zero(self):
        return replace(self, length=0)  # no rows: attention is the pre-trained one


class Prefix(Controller):
    def __init__(self, cfg: PrefixConfig, sites, d_model: int):
        super().__init__(cfg, sites)
        self.shapes = {s.name: (s.dims["heads"], s.dims["head_dim"]) for s in sites}
        widths = [2 * h * d for h, d in self.shapes.values()]
        self.offsets = dict(zip(self.shapes, torch.tensor([0, *widths]).cumsum(0).tolist()))
        if cfg.reparameterize:
            self.embedding = nn.Parameter(torch.randn(cfg.length, d_model))
            self.mlp_in = nn.Linear(d_model, cfg.mid_dim)
            self.mlp_out = nn.Linear(cfg.mid_dim, sum(widths))
        else:
            self.rows = nn.ParameterDict(
                {site_key(n): nn.Parameter(torch.randn(cfg.length, w)) for n, w in zip(self.shapes, widths)}
            )

    def site_rows(self, site: str) -> torch.Tensor:
        """The p × 2·heads·head_dim key/value rows of one memory."""
        if not self.config.reparameterize:
            return self.rows[site_key(site)]
        heads, head_dim = self.shapes[site]
        lo = self.offsets[site]
        hi = lo + 2 * heads * head_dim
        hidden = torch.tanh(self.mlp_in(self.embedding))
        return F.linear(hidden, self.mlp_out.weight[lo:hi], self.mlp_out.bias[lo:hi])

    def control(self, site, batch_size):
        heads, head_dim = self.shapes[site]
        rows = self.site_rows(site).view(-1, 2, heads, head_dim).permute(1, 2, 0, 3)  # (2, heads, p, head_dim)
        keys, values = rows.unsqueeze(1).expand(2, batch_size, heads, -1, head_dim)
        return keys, values


def build(cfg, backbone, sites):
    if cfg.length < 0:
        raise ValueError(f"prefix length must be ≥ 0, got {cfg.length}")
    return Prefix(cfg, sites, sites[0].dims["d_model"])


def count(cfg, sites):
    widths = sum(2 * s.dims["heads"] * s.dims["head_dim"] for s in sites)
    if not cfg.reparameterize:
        return cfg.length * widths
    d, m = sites[0].dims["d_model"], cfg.mid_dim
    return cfg.length * d + (d * m + m) + (m * widths + widths)


register(PrefixConfig, {"memory"}, build, count)
