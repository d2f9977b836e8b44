"""The method registry: a delta method is a frozen config, a builder of its controller and its closed-form size."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from deltactl.backbones.sites import Site, select


@dataclass(frozen=True)
class DeltaConfig:
    """Base of method configs: where the method acts (site patterns) plus its hyper-parameters."""

    method: ClassVar[str]
    # Options that keep the method small on a tiny model (tests, theory checks), and the options it has no
    # default for (with an example value): make_example uses them.
    small: ClassVar[dict] = {}
    required: ClassVar[dict] = {}
    sites: tuple[str, ...] = ()

    def zero(self) -> "DeltaConfig":
        """A config whose control is the identity (the pre-trained model); the config itself when δ starts at 0."""
        return self

    def site_patterns(self, sites: dict[str, Site]) -> tuple[str, ...]:
        """The site patterns on a given model; methods that choose sites from the model (the last layer, a
        random selection) override this."""
        return self.sites

    def to_dict(self) -> dict:
        return {"method": self.method, **dataclasses.asdict(self)}

    @property
    def default_sites(self) -> bool:
        """Whether ``sites`` are the method's defaults: patterns for every family, not names a user chose."""
        return self.sites == next(f.default for f in dataclasses.fields(self) if f.name == "sites")


@dataclass(frozen=True)
class Method:
    """One registered delta method.

    Args:
        config: its DeltaConfig subclass (defaults are the method's standard setting).
        kinds: the site kinds it acts on.
        build: ``build(config, backbone, sites) -> Controller`` with δ at its initial value.
        count: ``count(config, sites) -> int``, the closed-form number of δ parameters.
    """

    config: type
    kinds: frozenset
    build: Callable
    count: Callable[[DeltaConfig, list[Site]], int]

    @property
    def name(self) -> str:
        return self.config.method


REGISTRY: dict[str, Method] = {}


def register(config: type, kinds, build: Callable, count: Callable) -> Method:
    method = Method(config, frozenset(kinds), build, count)
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown delta method {name!r}{hint} (registered: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def sites_of(config: DeltaConfig, sites: dict[str, Site]) -> list[Site]:
    """The sites a method config acts on among a backbone's ``sites``.

    Patterns a user gave must each match; the method's defaults may name sites that only some families have.
    """
    method = get(config.method)
    return select(config.site_patterns(sites), sites, method.kinds, method.name, every=not config.default_sites)


def make_config(name: str, **overrides) -> DeltaConfig:
    """The config of method ``name`` with some fields changed; unknown fields are an error that lists the valid ones."""
    cls = get(name).config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in overrides if k not in fields]
    if unknown:
        raise TypeError(f"{name} has no option {unknown[0]!r}; its options are {', '.join(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def make_example(name: str, small: bool = True, **overrides) -> DeltaConfig:
    """A usable config of method ``name`` for a tiny model: its ``small`` options (or, with ``small=False``, its
    defaults as a user would attach it), plus the options it has no default for, plus ``overrides``."""
    cls = get(name).config
    return make_config(name, **{**cls.required, **(cls.small if small else {}), **overrides})


def config_from_dict(data: dict):
    """Inverse of ``to_dict`` (and of a combination's dict form)."""
    from deltactl.control.combinators import Combination

    data = dict(data)
    how = data.pop("method")
    if how in ("chain", "sum"):
        return Combination(how, tuple(config_from_dict(p) for p in data["parts"]))
    return make_config(how, **data)
