"""The d90 search: the smallest subspace dimension d whose training reaches 90% of full training's metric
(Li et al., ICLR 2018; Aghajanyan et al., ACL 2021 define d90 this way over a grid of d)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass


@dataclass
class D90Result:
    """The curve (d, metric) of one search, the full-training reference and the d reaching ``share`` of it.

    ``d90`` is the smallest grid d with metric ≥ share·full (None if none does); ``d90_interpolated`` interpolates
    linearly in log d between that grid point and the one below it (None when d90 is None or the first point).
    """

    dims: list[int]
    metrics: list[float]
    full: float
    share: float
    d90: int | None
    d90_interpolated: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def d90_from_curve(dims: Sequence[int], metrics: Sequence[float], full: float, share: float = 0.9) -> D90Result:
    """d90 of a measured curve; the grid is sorted by d first."""
    if len(dims) != len(metrics) or not dims:
        raise ValueError(f"need as many metrics as dims (at least one), got {len(dims)} dims and {len(metrics)}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    pairs = sorted(zip(dims, metrics))
    dims, metrics = [d for d, _ in pairs], [m for _, m in pairs]
    target = share * full
    hit = next((i for i, m in enumerate(metrics) if m >= target), None)
    d90 = None if hit is None else dims[hit]
    interpolated = None
    if hit:
        (d0, m0), (d1, m1) = pairs[hit - 1], pairs[hit]
        t = (target - m0) / (m1 - m0) if m1 != m0 else 1.0
        interpolated = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return D90Result(list(dims), list(metrics), full, share, d90, interpolated)


def d90_search(train_at: Callable[[int], float], dims: Sequence[int], full: float, share: float = 0.9,
               stop_early: bool = False) -> D90Result:
    """Train at each d of ``dims`` (``train_at(d) -> metric``) and return the curve and its d90.

    Args:
        train_at: trains a fresh subspace of dimension d and returns its evaluation metric.
        dims: the grid of d; full: the metric of full training (the reference).
        stop_early: stop at the first d that reaches the target (the rest of the curve is then not measured).
    """
    if any(int(d) != d or d < 1 for d in dims):
        raise ValueError(f"dims must be positive integers, got {list(dims)}")
    measured_dims, metrics = [], []
    for d in sorted(dims):
        measured_dims.append(int(d))
        metrics.append(float(train_at(int(d))))
        if stop_early and metrics[-1] >= share * full:
            break
    return d90_from_curve(measured_dims, metrics, full, share)


def plot_d90(curves: dict[str, D90Result], path, title: str = "") -> None:
    """One figure: metric against d (log axis) per curve, the full-training level and its 90% line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, res) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(res.dims, res.metrics, "o-", color=color, label=f"{label} (d90={res.d90 or '>' + str(res.dims[-1])})")
        ax.axhline(res.share * res.full, color=color, ls=":", lw=1)
        ax.axhline(res.full, color=color, ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("metric")
    ax.set_title(title or "d90: dashed = full training, dotted = 90% of it")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
