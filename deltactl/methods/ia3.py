"""IA3 (Liu et al., 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than in-context
learning"): learned vectors rescale the keys, the values and the FFN's inner activations,

    k ← l_k ⊙ k,   v ← l_v ⊙ v,   FFN(x) = W_o (l_ff ⊙ σ(W_i x)),

with every l = 1 at the start. The FFN scaling acts on the input of ``ffn.wo`` (a law with ``acts_on = "input"``),
as PEFT's ``feedforward_modules`` do. Merging scales the weights' rows (keys, values) or columns (``wo``).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class IA3Config(DeltaConfig):
    """Args: sites linear patterns; feedforward those of them whose input is scaled instead of their output."""

    method: ClassVar[str] = "ia3"
    sites: tuple[str, ...] = ("*.k", "*.v", "*.ffn.wo")
    feedforward: tuple[str, ...] = ("*.ffn.wo",)


class Scale(nn.Module):
    """y ⊙ l at a layer's output, or x ⊙ l at its input (``acts_on``); l = 1 is the identity."""

    def __init__(self, d: int, acts_on: str):
        super().__init__()
        self.l = nn.Parameter(torch.ones(d))
        self.acts_on = acts_on

    def forward(self, x, y=None):
        z = x if self.acts_on == "input" else y
        return (z.to(self.l.dtype) * self.l).to(z.dtype)  # in δ's dtype, rounded once to the layer's

    def weight_laws(self, site):
        if self.acts_on == "input":  # W (l ⊙ x) = (W diag l) x: scale the columns
            return [("weight", lambda W: W * self.l)]
        return [("weight", lambda W: W * self.l[:, None]), ("bias", lambda b: None if b is None else b * self.l)]


def _on_input(cfg, site) -> bool:
    return any(fnmatch.fnmatchcase(site.name, p) for p in cfg.feedforward)


def build(cfg, backbone, sites):
    layers = {}
    for s in sites:
        on_input = _on_input(cfg, s)
        layers[s.name] = Scale(s.dims["in" if on_input else "out"], "input" if on_input else "output")
    return PerSite(cfg, sites, layers)


def count(cfg, sites):
    return sum(s.dims["in" if _on_input(cfg, s) else "out"] for s in sites)


register(IA3Config, {"linear"}, build, count)
