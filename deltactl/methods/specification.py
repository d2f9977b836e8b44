"""What the specification methods share: a change Δ of chosen base weights, θ' = θ + Δ with Δ = 0 at the start.

LN-tuning, last-layer, selective-module and named-parameter tuning differ only in which parameter sites they
choose; each is a config in its own file, built and counted here. The law acts where the weight is used
(``deltactl.backbones.parameters``), so the base weights are never written, and merging writes θ + Δ.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltactl.control.controller import PerSite


class Shift(nn.Module):
    """θ ↦ θ + Δ for one weight."""

    def __init__(self, shape):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, theta):
        return (theta + self.delta).to(theta.dtype)  # θ + Δ formed in δ's dtype, rounded once to θ's

    def weight_laws(self, site):
        return [(site.dims["param"], self)]


def build(cfg, backbone, sites):
    if not sites:
        raise ValueError(f"{cfg.method} selected no weights on this model; name some with sites=(...)")
    return PerSite(cfg, sites, {s.name: Shift(s.dims["shape"]) for s in sites})


def count(cfg, sites):
    return sum(math.prod(s.dims["shape"]) for s in sites)
