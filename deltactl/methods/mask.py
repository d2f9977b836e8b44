"""Learned masks (Zhao et al., 2020, "Masking as an efficient alternative to finetuning for pretrained
language models"): θ' = θ ⊙ m with a binary mask m = 1[s > τ] over real scores s, trained through the
straight-through estimator (∂L/∂s := ∂L/∂m). Scores start above τ, so the mask starts all ones: the
pre-trained model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class MaskConfig(DeltaConfig):
    """Args: sites parameter patterns (default: the blocks' linear weights); threshold τ; init score."""

    method: ClassVar[str] = "mask"
    sites: tuple[str, ...] = ("*.q.weight", "*.k.weight", "*.v.weight", "*.o.weight", "*.wi*.weight", "*.wo.weight")
    threshold: float = 5e-3
    init: float = 1e-2


class Mask(nn.Module):
    def __init__(self, shape, cfg: MaskConfig):
        super().__init__()
        if cfg.init <= cfg.threshold:
            raise ValueError(f"init ({cfg.init}) must exceed threshold ({cfg.threshold}) so the mask starts all ones")
        self.scores = nn.Parameter(torch.full(shape, float(cfg.init)))
        self.threshold = cfg.threshold

    def mask(self):
        hard = (self.scores > self.threshold).to(self.scores.dtype)
        return hard + (self.scores - self.scores.detach())  # the value of hard, the gradient of the identity

    def forward(self, theta):
        return (theta * self.mask()).to(theta.dtype)  # θ or 0 exactly, in any dtype

    def weight_laws(self, site):
        return [(site.dims["param"], lambda theta: theta * (self.scores > self.threshold).to(theta.dtype))]

    @torch.no_grad()
    def kept(self) -> int:
        return int((self.scores > self.threshold).sum())


def build(cfg, backbone, sites):
    return PerSite(cfg, sites, {s.name: Mask(s.dims["shape"], cfg) for s in sites})


def count(cfg, sites):
    return sum(math.prod(s.dims["shape"]) for s in sites)


register(MaskConfig, {"parameter"}, build, count)
