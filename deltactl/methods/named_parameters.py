"""Tune the weights you name: θ' = θ + Δ on the parameter sites matching ``sites`` (canonical names such as
``encoder.3.attn.q.weight``, globs allowed; ``deltactl inspect --sites '*.weight'`` lists them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltactl.control.registry import DeltaConfig, register
from deltactl.methods import specification


@dataclass(frozen=True)
class NamedParametersConfig(DeltaConfig):
    """Args: sites parameter-site patterns (required)."""

    method: ClassVar[str] = "named"
    small: ClassVar[dict] = {"sites": ("encoder.0.attn.q.weight", "*.ffn.ln.weight")}
    required: ClassVar[dict] = {"sites": ("encoder.0.attn.q.weight",)}

    def site_patterns(self, sites):
        if not self.sites:
            raise ValueError(
                "named tunes the weights you name: pass sites=(...), e.g. ('encoder.0.attn.q.weight', '*.ln.*')"
            )
        return self.sites


register(NamedParametersConfig, {"parameter"}, specification.build, specification.count)
