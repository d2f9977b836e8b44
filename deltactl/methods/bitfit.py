"""BitFit (Ben Zaken et al., 2022): tune only bias terms, y' = y + b with b = 0 at the start.

Where the layer has a bias (BERT) b is the change of that bias; where it has none (T5) it is a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class BitFitConfig(DeltaConfig):
    """Args: sites the linear and norm outputs that get a bias (default: all of them)."""

    method: ClassVar[str] = "bitfit"
    sites: tuple[str, ...] = ("*.q", "*.k", "*.v", "*.o", "*.wi*", "*.wo", "*.ln", "*.final_ln", "*.embed_ln")


class Bias(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d))

    def forward(self, x, y):
        return (y + self.bias).to(y.dtype)

    def weight_laws(self, site):
        return [("bias", lambda b: self.bias.clone() if b is None else b + self.bias)]


def _width(site) -> int:
    return site.dims["out"] if site.kind == "linear" else site.dims["d"]


def build(cfg, backbone, sites):
    return PerSite(cfg, sites, {s.name: Bias(_width(s)) for s in sites})


def count(cfg, sites):
    return sum(_width(s) for s in sites)


register(BitFitConfig, {"linear", "norm"}, build, count)
