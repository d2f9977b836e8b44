"""LoRA (Hu et al., 2022): a low-rank update of a weight, y = W x + (α/r) B A x, with B = 0 at the start."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class LoRAConfig(DeltaConfig):
    """Args: r rank; alpha scale numerator (scale α/r); dropout on the LoRA input; sites linear patterns."""

    method: ClassVar[str] = "lora"
    small: ClassVar[dict] = {"r": 2}
    sites: tuple[str, ...] = ("*.q", "*.v")
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0


def lora_update(x, A, B, scale):
    """(α/r) B A x for a batch of rows x."""
    return F.linear(F.linear(x, A), B) * scale


class LoRALayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: LoRAConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(cfg.r, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, cfg.r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
        self.scale = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, x, y):
        # In δ's dtype (float32 on a half base, as PEFT computes), rounded once to the layer's dtype.
        x = x.to(self.A.dtype)
        x = x if self.dropout is None else self.dropout(x)
        return (y + lora_update(x, self.A, self.B, self.scale)).to(y.dtype)

    def weight_laws(self, site):
        return [("weight", lambda W: W + self.scale * (self.B @ self.A))]  # W ← W + (α/r) B A


def build(cfg, backbone, sites):
    if cfg.r < 1:
        raise ValueError(f"LoRA rank r must be ≥ 1, got {cfg.r}")
    return PerSite(cfg, sites, {s.name: LoRALayer(s.dims["in"], s.dims["out"], cfg) for s in sites})


def count(cfg, sites):
    return sum(cfg.r * (s.dims["in"] + s.dims["out"]) for s in sites)


register(LoRAConfig, {"linear"}, build, count)
