"""Exact parameter accounting: what a delta adds, measured on the model and in closed form."""

from __future__ import annotations

from dataclasses import dataclass

from deltactl.control import registry
from deltactl.control.combinators import Combination
from deltactl.control.root import attached_deltas, base_named_parameters

# Trainable share of T5-base reported by the delta-tuning paper (Ding et al., 2023), for comparison.
PAPER_PERCENT_T5_BASE = {"prompt": 0.03, "lora": 0.38, "adapter": 2.38, "prefix": 7.93}


@dataclass(frozen=True)
class Count:
    base: int  # parameters of the pre-trained model
    trainable: int  # parameters with requires_grad (δ while deltas are attached)
    deltas: dict  # delta name -> its parameter count

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.base


def count(model) -> Count:
    """Base size, trainable size and per-delta sizes of a model as it is now."""
    base = sum(p.numel() for _, p in base_named_parameters(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    deltas = {name: sum(p.numel() for p in c.parameters()) for name, c in attached_deltas(model).items()}
    return Count(base, trainable, deltas)


def closed_form(config, backbone) -> int:
    """The number of δ parameters a config gives on a backbone, from the method's formula (no tensors built)."""
    if isinstance(config, Combination):
        return sum(closed_form(p, backbone) for p in config.parts)
    return registry.get(config.method).count(config, registry.sites_of(config, backbone.sites))
