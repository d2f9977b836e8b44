"""Combinators: several controllers acting as one, instead of subclasses that merge methods."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltactl.control.controller import Controller
from deltactl.control.sites import OUTPUT_KINDS


@dataclass(frozen=True)
class Combination:
    """A recipe for a combined controller: ``how`` is "chain" or "sum", ``parts`` are configs."""

    how: str
    parts: tuple

    method = property(lambda self: self.how)

    def zero(self):
        return Combination(self.how, tuple(p.zero() for p in self.parts))

    def to_dict(self) -> dict:
        return {"method": self.how, "parts": [p.to_dict() for p in self.parts]}


def chain(*configs) -> Combination:
    """a then b: at a shared site y' = G_b(x, G_a(x, y)); memory and sequence rows are a's, then b's."""
    return Combination("chain", tuple(configs))


def sum(*configs) -> Combination:  # noqa: A001 - the combinator's name in the design
    """Parallel controls: at each site y' = y + Σᵢ (G_i(x, y) − y). Output sites only."""
    return Combination("sum", tuple(configs))


class Chain(Controller):
    def __init__(self, config, parts: list[Controller]):
        super().__init__(config, [s for p in parts for s in p.sites])
        self.parts = nn.ModuleList(parts)

    def controls(self):
        return [pair for part in self.parts for pair in part.controls()]


class Sum(Controller):
    def __init__(self, config, parts: list[Controller]):
        sites = {s.name: s for p in parts for s in p.sites}
        bad = [s for s in sites.values() if s.kind not in OUTPUT_KINDS]
        if bad:
            raise ValueError(
                f"sum adds controls at output sites; {bad[0].name!r} is a {bad[0].kind} site "
                "(combine memory or sequence rows with chain)"
            )
        super().__init__(config, list(sites.values()))
        self.parts = nn.ModuleList(parts)

    def control(self, site, x, y):
        out = y
        for part in self.parts:
            laws = [law for s, law in part.controls() if s.name == site]
            if laws:  # a part's own laws at this site compose in order (a chain may act there twice)
                part_out = y
                for law in laws:
                    part_out = law(x, part_out)
                out = out + (part_out - y)
        return out
