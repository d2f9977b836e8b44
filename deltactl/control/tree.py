"""A printable tree of a model's canonical sites and the controllers acting at each."""

from __future__ import annotations

import fnmatch

from deltactl.backbones import backbone_for
from deltactl.control.accounting import count
from deltactl.control.root import attached_deltas


def _describe(site) -> str:
    d = site.dims
    if site.kind == "linear":
        return f"{d['in']}→{d['out']}"
    if site.kind == "memory":
        return f"{d['heads']}×{d['head_dim']}"
    if site.kind == "parameter":
        return "×".join(map(str, d["shape"]))
    return f"d={d['d']}"


def tree(model, patterns=None, attached_only: bool = False) -> str:
    """Sites grouped by stack and layer, with ``◀ name`` for each attached delta acting there.

    Args:
        patterns: only sites matching one of these globs.
        attached_only: only sites where a delta acts.

    Parameter sites (every weight) are listed where a delta acts or when ``patterns`` select them.
    """
    backbone = backbone_for(model)
    acting: dict[str, list[str]] = {}
    for name, controller in attached_deltas(model).items():
        for site, _ in controller.controls():
            acting.setdefault(site.name, []).append(name)
    n = count(model)
    lines = [
        f"{type(model).__name__} ({backbone.family}): {n.base:,} base parameters, "
        f"{n.trainable:,} trainable ({n.percent:.3f}%)"
    ]
    for name, size in n.deltas.items():
        config = attached_deltas(model)[name].config
        lines.append(f"  delta {name}: {size:,} parameters  {config}")
    group = None
    for site in backbone.sites.values():
        if patterns and not any(fnmatch.fnmatchcase(site.name, p) for p in patterns):
            continue
        if attached_only and site.name not in acting:
            continue
        if site.kind == "parameter" and site.name not in acting and not patterns:
            continue  # every weight is a site; list them when asked for, or where a delta acts
        parts = site.name.split(".")
        head = ".".join(parts[:2]) if site.layer is not None else parts[0]
        if head != group:
            lines.append(head)
            group = head
        mark = "  ◀ " + ", ".join(acting[site.name]) if site.name in acting else ""
        lines.append(f"  {site.name:<28}{site.kind:<9}{_describe(site):<12}{mark}".rstrip())
    return "\n".join(lines)
