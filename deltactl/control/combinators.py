"""Combinators: several controllers acting as one, instead of subclasses that merge methods."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deltactl.backbones.sites import OUTPUT_KINDS
from deltactl.control.controller import Controller


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

    def penalty(self):
        return _total(p.penalty() for p in self.parts)

    def weight_laws(self):
        return [law for part in self.parts for law in part.weight_laws()]  # a, then b: the chain's order


def _total(terms):
    """Σ of the parts' penalties that exist (None if none does)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


class Sum(Controller):
    def __init__(self, config, parts: list[Controller]):
        sites = {s.name: s for p in parts for s in p.sites}
        bad = [s for s in sites.values() if s.kind not in OUTPUT_KINDS]
        bad += [s for p in parts for s, law in p.controls() if getattr(law, "acts_on", "output") != "output"]
        if bad:
            raise ValueError(
                f"sum adds controls at output sites; {bad[0].name!r} is a {bad[0].kind} site "
                "(combine memory, sequence, parameter or input laws with chain)"
            )
        super().__init__(config, list(sites.values()))
        self.parts = nn.ModuleList(parts)

    def penalty(self):
        return _total(p.penalty() for p in self.parts)

    def controls(self):
        """(site, law) pairs; a law passes the attention mask its backbone shows it on to the parts' laws that read
        one (``see_tokens``, see backbones/base.py)."""
        pairs = []
        for site, law in super().controls():
            seers = [part_law.see_tokens for part in self.parts for s, part_law in part.controls()
                     if s.name == site.name and hasattr(part_law, "see_tokens")]
            pairs.append((site, _SeeingLaw(law, seers) if seers else law))
        return pairs

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


class _SeeingLaw:
    """A law that also shows the token mask of the pass to the laws it sums (their ``see_tokens``)."""

    def __init__(self, law, seers):
        self.law, self.seers = law, seers

    def __call__(self, *payload):
        return self.law(*payload)

    def see_tokens(self, mask, past):
        for see in self.seers:
            see(mask, past)
