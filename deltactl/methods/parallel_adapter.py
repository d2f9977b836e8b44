"""Parallel adapter (He et al., 2022, "Towards a unified view of parameter-efficient transfer learning"):
a bottleneck net beside a sub-layer, reading the sub-layer's input h rather than its output,

    F(h) ← F(h) + s · U σ(D h),

with U = 0 at the start. He et al. place it beside the FFN with s = 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltactl.backbones.compat import ACT2FN
from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class ParallelAdapterConfig(DeltaConfig):
    """Args: r bottleneck width; scale s; activation a transformers activation name; sites branch patterns."""

    method: ClassVar[str] = "parallel_adapter"
    small: ClassVar[dict] = {"r": 3}
    sites: tuple[str, ...] = ("*.ffn.out",)
    r: int = 64
    scale: float = 4.0
    activation: str = "relu"


class ParallelAdapter(nn.Module):
    def __init__(self, d: int, cfg: ParallelAdapterConfig):
        super().__init__()
        if cfg.activation not in ACT2FN:
            raise ValueError(f"unknown activation {cfg.activation!r}; e.g. relu, gelu, gelu_new, silu")
        self.down, self.up = nn.Linear(d, cfg.r), nn.Linear(cfg.r, d)
        self.act, self.scale = ACT2FN[cfg.activation], cfg.scale
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, y):  # branch protocol: x the sub-layer input h, y its update F(h)
        return (y + self.scale * self.up(self.act(self.down(x.to(self.up.weight.dtype))))).to(y.dtype)


def build(cfg, backbone, sites):
    return PerSite(cfg, sites, {s.name: ParallelAdapter(s.dims["d"], cfg) for s in sites})


def count(cfg, sites):
    return sum(2 * s.dims["d"] * cfg.r + s.dims["d"] + cfg.r for s in sites)


register(ParallelAdapterConfig, {"branch"}, build, count)
