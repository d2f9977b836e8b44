"""Houlsby adapter (Houlsby et al., 2019): a bottleneck net on each sub-layer's update, F ← F + U σ(D F)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from deltactl.backbones.compat import ACT2FN
from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class AdapterConfig(DeltaConfig):
    """Args: r bottleneck width; activation a transformers activation name; sites branch (sub-layer) patterns."""

    method: ClassVar[str] = "adapter"
    small: ClassVar[dict] = {"r": 3}
    sites: tuple[str, ...] = ("*.attn.out", "*.ffn.out")
    r: int = 64
    activation: str = "relu"


class Adapter(nn.Module):
    """Sequential adapter on a sub-layer update; the up-projection starts at zero, so G(h, δ₀) = f(h)."""

    def __init__(self, d: int, cfg: AdapterConfig):
        super().__init__()
        if cfg.activation not in ACT2FN:
            raise ValueError(f"unknown activation {cfg.activation!r}; e.g. relu, gelu, gelu_new, silu")
        self.down = nn.Linear(d, cfg.r)
        self.up = nn.Linear(cfg.r, d)
        self.act = ACT2FN[cfg.activation]
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x, y):
        return (y + self.up(self.act(self.down(y.to(self.up.weight.dtype))))).to(y.dtype)


def build(cfg, backbone, sites):
    return PerSite(cfg, sites, {s.name: Adapter(s.dims["d"], cfg) for s in sites})


def count(cfg, sites):
    return sum(2 * s.dims["d"] * cfg.r + s.dims["d"] + cfg.r for s in sites)


register(AdapterConfig, {"branch", "state"}, build, count)
