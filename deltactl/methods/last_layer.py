"""Last-layer tuning: only the weights of the top block(s) of a stack change (the specification baseline of
the delta-tuning paper; Lee et al., 2019, "What would Elsa do? Freezing layers during transformer fine-tuning")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltactl.control.registry import DeltaConfig, register
from deltactl.methods import specification


@dataclass(frozen=True)
class LastLayerConfig(DeltaConfig):
    """Args: layers how many top blocks; stack "encoder" or "decoder"."""

    method: ClassVar[str] = "last_layer"
    layers: int = 1
    stack: str = "encoder"

    def site_patterns(self, sites):
        depth = {s.layer for s in sites.values() if s.stack == self.stack and s.layer is not None}
        if not depth:
            stacks = sorted({s.stack for s in sites.values() if s.layer is not None})
            raise ValueError(f"this model has no {self.stack!r} stack; it has {', '.join(stacks)}")
        if not 1 <= self.layers <= len(depth):
            raise ValueError(f"layers must be between 1 and {len(depth)} (the {self.stack}'s depth), got {self.layers}")
        return tuple(f"{self.stack}.{j}.*" for j in sorted(depth)[-self.layers :])


register(LastLayerConfig, {"parameter"}, specification.build, specification.count)
