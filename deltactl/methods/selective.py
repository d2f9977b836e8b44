"""Selective-module tuning: a random, seed-fixed choice of modules across layers — FFNs, query/key/value
projections, layer norms — tuned as θ' = θ + Δ within a parameter budget (the selective baseline of the
delta-tuning paper's specification family).

The units are (stack, layer, group); they are visited in a seeded random order and each is taken if it still
fits the budget (a share of the backbone's weights), so the same seed on the same architecture always picks the
same modules.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import ClassVar

from deltactl.control.registry import DeltaConfig, register
from deltactl.methods import specification

GROUPS = {"ffn": ("wi", "wi_0", "wi_1", "wo"), "q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",), "ln": ("ln",)}


@dataclass(frozen=True)
class SelectiveConfig(DeltaConfig):
    """Args: budget share of the backbone's weights; groups among ffn, q, k, v, o, ln; seed of the choice."""

    method: ClassVar[str] = "selective"
    small: ClassVar[dict] = {"budget": 0.3}
    budget: float = 0.05
    groups: tuple[str, ...] = ("ffn", "q", "k", "v", "ln")
    seed: int = 0

    def site_patterns(self, sites):
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown module group {unknown[0]!r}; groups are {', '.join(GROUPS)}")
        if not 0 < self.budget <= 1:
            raise ValueError(f"budget is a share of the backbone's weights in (0, 1], got {self.budget}")
        units: dict[tuple, list] = {}
        total = 0
        for site in sites.values():
            if site.kind != "parameter":
                continue
            size = math.prod(site.dims["shape"])
            total += size
            group = _group(site.name)
            if site.layer is not None and group in self.groups:
                units.setdefault((site.stack, site.layer, group), []).append((site.name, size))
        order = sorted(units)
        random.Random(self.seed).shuffle(order)
        chosen, used = [], 0
        for unit in order:
            size = sum(n for _, n in units[unit])
            if used + size <= self.budget * total:
                chosen += [name for name, _ in units[unit]]
                used += size
        if not chosen:
            smallest = min((sum(n for _, n in u) for u in units.values()), default=0)
            raise ValueError(
                f"a budget of {self.budget} ({self.budget * total:,.0f} weights) fits no module of groups "
                f"{', '.join(self.groups)}; the smallest needs {smallest:,}"
            )
        return tuple(chosen)


def _group(name: str) -> str | None:
    """ffn, q, k, v, o or ln for a block weight named {stack}.{j}.{attn|cross|ffn}.{proj}.{param}."""
    parts = name.split(".")
    if len(parts) != 5:
        return None
    return next((g for g, projs in GROUPS.items() if parts[3] in projs), None)


register(SelectiveConfig, {"parameter"}, specification.build, specification.count)
