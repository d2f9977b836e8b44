"""Pfeiffer adapter (Pfeiffer et al., 2021, "AdapterFusion"): the Houlsby bottleneck after the FFN only,

    F_ffn ← F_ffn + U σ(D F_ffn),

half the adapters of Houlsby's placement for nearly the same accuracy. Same per-site net as ``adapter``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltactl.control.registry import register
from deltactl.methods import adapter


@dataclass(frozen=True)
class PfeifferConfig(adapter.AdapterConfig):
    """Args: r bottleneck width; activation; sites branch patterns (default: each FFN's update)."""

    method: ClassVar[str] = "pfeiffer"
    small: ClassVar[dict] = {"r": 3}
    sites: tuple[str, ...] = ("*.ffn.out",)


register(PfeifferConfig, {"branch", "state"}, adapter.build, adapter.count)
