"""LN-tuning (Qi et al., 2022, "Parameter-efficient tuning on layer normalization for pre-trained language
models"): only the layer norms' gains (and biases, where the family has them) change, γ' = γ + Δγ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltactl.control.registry import DeltaConfig, register
from deltactl.methods import specification


@dataclass(frozen=True)
class LNTuningConfig(DeltaConfig):
    """Args: sites parameter patterns (default: every layer norm's weight and bias)."""

    method: ClassVar[str] = "ln_tuning"
    sites: tuple[str, ...] = ("*.ln.*", "*.final_ln.*", "*.embed_ln.*")


register(LNTuningConfig, {"parameter"}, specification.build, specification.count)
