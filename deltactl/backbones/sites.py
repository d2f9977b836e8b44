"""Canonical sites: the named places of a backbone where a controller can act, and their selection."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field

# What a controller at a site receives and returns (the hook protocol of each kind):
#   linear, norm, branch, state:  y' = G(x, y)  — x the module's input, y its output (same shape as y');
#             at a branch, x is the sub-layer's input h and y its update F(h)
#   memory:   rows(batch) -> (keys, values), each (batch, heads, rows, head_dim), extra attention memory
#   sequence: rows(embeds) -> (batch, rows, d_model), extra input rows placed before the sequence
#   parameter: θ' = G(θ) — a weight of the backbone, replaced by G(θ) wherever the model uses it
# A law at a linear site may act on the layer's input instead (``acts_on = "input"``): x' = G(x).
OUTPUT_KINDS = frozenset({"linear", "norm", "branch", "state"})
KINDS = OUTPUT_KINDS | {"memory", "sequence", "parameter"}


@dataclass(frozen=True)
class Site:
    """One place where a controller can act.

    Args:
        name: canonical name, e.g. ``"encoder.3.attn.q"`` or ``"decoder.1.cross.kv"``.
        kind: one of ``KINDS``; fixes the hook protocol (see above).
        module: dotted path of the backbone module the site hooks.
        dims: kind-specific sizes: linear ``in``/``out``; norm, branch, state, sequence ``d``;
            memory ``heads``/``head_dim``; parameter ``shape``, ``param`` (its attribute name) and ``owners``
            (every (module path, attribute) holding it).
    """

    name: str
    kind: str
    module: str
    dims: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def stack(self) -> str:
        return self.name.split(".")[0]

    @property
    def layer(self) -> int | None:
        part = self.name.split(".")[1]
        return int(part) if part.isdigit() else None


def select(
    patterns, sites: dict[str, Site], kinds=KINDS, method: str = "controller", every: bool = True
) -> list[Site]:
    """Sites matched by glob patterns (``*`` within and across dots), in backbone order.

    With ``every`` (patterns a user wrote), each pattern must match at least one site of an accepted kind, so a
    typo is an error. Without it (a method's default patterns, which name a role in every family, such as T5's
    ``*.final_ln`` and BERT's ``*.embed_ln``), patterns naming nothing on this model are skipped, and only a list
    that selects nothing at all is an error. The error names the pattern, what it did match, and the closest
    valid names.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: set[str] = set()
    missed: list[str] = []
    for pattern in patterns:
        hits = [n for n in sites if fnmatch.fnmatchcase(n, pattern)]
        usable = [n for n in hits if sites[n].kind in kinds]
        if not usable:
            missed.append(_no_match_message(pattern, hits, sites, kinds, method))
            if every:
                raise ValueError(missed[0])
        chosen.update(usable)
    if missed and not chosen:
        raise ValueError(missed[0])
    return [site for name, site in sites.items() if name in chosen]


def _no_match_message(pattern, hits, sites, kinds, method) -> str:
    accepted = ", ".join(sorted(kinds))
    if hits:
        found = sorted({sites[n].kind for n in hits})
        return (
            f"site pattern {pattern!r} matches only {', '.join(found)} sites (e.g. {hits[0]!r}), "
            f"but {method} acts on {accepted} sites"
        )
    valid = [n for n, s in sites.items() if s.kind in kinds]
    close = difflib.get_close_matches(pattern, valid, n=5, cutoff=0.4)
    if not close:  # a glob rarely resembles a name: compare its last parts instead
        tail = pattern.split(".")[-1]
        close = sorted({n for n in valid if n.endswith("." + tail)})[:5] or valid[:5]
    return (
        f"site pattern {pattern!r} matches no {accepted} site of this model; "
        f"closest valid names: {', '.join(close)}"
    )
