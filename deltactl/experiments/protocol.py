"""The study protocol: what makes a study's number a finding rather than noise.

1. **Splits.** Every choice (learning rate, step count, early stopping) is made on a *selection* split; numbers are
   reported on a *report* split no choice has seen (the full GLUE dev set, or a held-out test split). For the
   16-shot LM-BFF tasks the selection split is the split's own 16-shot dev file and the report split the task's test
   set. ``check_disjoint`` refuses splits that share an example (compared by content, not by position).
2. **Learning rates** come from a small per-method grid, chosen on the selection split (``select``).
3. **Seeds**: at least 3; every table cell is the mean over seeds with a percentile-bootstrap 95% interval
   (``summary``), and a difference between two methods gets a paired bootstrap interval over seeds
   (``paired_summary``: seed i of one method against seed i of the other, the same data order).
4. **Verdict rules are stated before the numbers** (``MatchRule``, ``BetterRule``) and applied to the intervals:
   each gives "agrees", "disagrees" or "inconclusive" with the paper's claim.

``check_results`` is what the test suite applies to every study that declares itself on this protocol: its splits
are disjoint, every table row carries a mean, an interval and ≥ 3 seeds, and its verdicts follow from its rule.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass

MIN_SEEDS = 3
LEVEL = 0.95
RESAMPLES = 10_000
VERDICTS = ("agrees", "disagrees", "inconclusive")
NO_DATA = "none"  # protocol.data of a study that measures the machine, not a model on data (efficiency)


def example_key(example) -> str:
    """A content hash of an example (its texts and label), so the same sentence in two splits is caught even when
    the splits come from different files."""
    fields = [getattr(example, name, None) for name in ("text_a", "text_b", "label")]
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:16]


def check_disjoint(selection, report) -> None:
    """Refuse a report split that shares an example with the selection split (by content)."""
    chosen = {example_key(e) for e in selection}
    shared = [e for e in report if example_key(e) in chosen]
    if shared:
        raise ValueError(f"the report split shares {len(shared)} of its {len(report)} examples with the selection "
                         f"split (e.g. {getattr(shared[0], 'text_a', shared[0])!r}); a number chosen on an example "
                         "cannot be reported on it")


def split_keys(examples) -> list[str]:
    """The content keys a study records for a split, so the disjointness can be re-checked from its results."""
    return sorted(example_key(e) for e in examples)


def bootstrap_interval(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement, a fixed seed)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to bootstrap")
    n = len(values)
    mean = math.fsum(values) / n  # computed as summary() does, so rounding never puts the mean outside
    if len(set(values)) == 1:
        return mean, mean
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    low, high = means[int(math.floor(tail * (resamples - 1)))], means[int(math.ceil((1.0 - tail) * (resamples - 1)))]
    return min(low, mean), max(high, mean)


@dataclass(frozen=True)
class Summary:
    """A table cell: mean over seeds, its bootstrap interval, and the per-seed values it came from."""

    mean: float
    low: float
    high: float
    n: int
    values: tuple

    def to_dict(self) -> dict:
        return {**asdict(self), "values": list(self.values), "level": LEVEL}

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}] (n={self.n})"


def summary(values) -> Summary:
    # Rounded to 12 decimals: a difference of equal accuracies computed through different sums (0.1 + 0.2 − 0.3)
    # is exactly 0 then, not ±3e-17, which a rule reading "the interval lies above/below 0" would take for a finding
    values = tuple(round(float(v), 12) for v in values)
    low, high = bootstrap_interval(values)
    return Summary(math.fsum(values) / len(values), low, high, len(values), values)


def paired_summary(a, b) -> Summary:
    """The mean difference a − b over paired seeds, with its bootstrap interval."""
    if len(a) != len(b):
        raise ValueError(f"paired seeds: {len(a)} values against {len(b)}; run both methods on the same seeds")
    return summary([x - y for x, y in zip(a, b)])


@dataclass(frozen=True)
class MatchRule:
    """"A matches B" (the paper's claim of parity): agrees if the interval of A − B lies within ±margin; disagrees
    if it lies wholly outside; inconclusive otherwise (the interval straddles a margin, too few seeds to tell)."""

    margin: float

    def verdict(self, difference: Summary) -> str:
        if -self.margin <= difference.low and difference.high <= self.margin:
            return "agrees"
        if difference.low > self.margin or difference.high < -self.margin:
            return "disagrees"
        return "inconclusive"

    def describe(self) -> str:
        return f"parity if the 95% interval of the difference lies within ±{self.margin:g}"


@dataclass(frozen=True)
class BetterRule:
    """"A beats B" (the paper's claim of an order): agrees if the interval of A − B lies above 0, disagrees if it
    lies below 0, inconclusive if it contains 0."""

    def verdict(self, difference: Summary) -> str:
        if difference.low > 0:
            return "agrees"
        if difference.high < 0:
            return "disagrees"
        return "inconclusive"

    def describe(self) -> str:
        return "an order if the 95% interval of the difference excludes 0"


def select(grid, score) -> tuple:
    """(best value, scores by value): ``score(value)`` is measured on the selection split, higher is better; ties go
    to the earlier grid value (so the grid's order states the preference)."""
    scores = {value: float(score(value)) for value in grid}
    if not scores:
        raise ValueError("an empty grid: give at least one value to choose from")
    best = max(scores, key=lambda v: (scores[v], -list(scores).index(v)))
    return best, scores


def check_results(results: dict) -> list[str]:
    """What is wrong with a study's results under the protocol (empty: nothing). A study on the protocol stores
    ``protocol: {"selection": keys, "report": keys}`` and ``table: [{..., "summary": Summary.to_dict()}, ...]`` and
    ``verdicts: [{"rule": ..., "difference": Summary.to_dict(), "verdict": ...}]``. A study that chooses nothing on
    data (peak memory, step time) stores ``protocol: {"data": NO_DATA, "why": ...}`` instead of split keys; its
    "seeds" are repeats in fresh processes."""
    problems = []
    protocol = results.get("protocol")
    if isinstance(protocol, dict) and protocol.get("data") == NO_DATA:
        # a measurement of the machine (memory, time) chooses nothing on data: there is no split to keep apart,
        # but the study must say why, and its repeats still need intervals and a rule
        if not str(protocol.get("why", "")).strip():
            problems.append("a study without data splits must say why it needs none (protocol.why)")
        if protocol.get("selection") or protocol.get("report"):
            problems.append("a study that declares no data records split keys: it has splits, so check them")
    elif not isinstance(protocol, dict) or "selection" not in protocol or "report" not in protocol:
        return ["no protocol record (selection and report split keys)"]
    else:
        shared = set(protocol["selection"]) & set(protocol["report"])
        if shared:
            problems.append(f"report split shares {len(shared)} examples with the selection split")
        if not protocol["report"]:
            problems.append("empty report split")
    rows = results.get("table") or []
    if not rows:
        problems.append("no table")
    for i, row in enumerate(rows):
        cell = row.get("summary") or {}
        if not {"mean", "low", "high", "n"} <= set(cell):
            problems.append(f"table row {i} ({row.get('method', '?')}) has no mean with an interval")
        elif cell["n"] < MIN_SEEDS:
            problems.append(f"table row {i} ({row.get('method', '?')}) rests on {cell['n']} seeds (< {MIN_SEEDS})")
        elif not cell["low"] <= cell["mean"] <= cell["high"]:
            problems.append(f"table row {i} ({row.get('method', '?')}): the mean lies outside its interval")
    for verdict in results.get("verdicts") or []:
        if verdict.get("verdict") not in VERDICTS:
            problems.append(f"verdict {verdict.get('claim', '?')!r} is not one of {', '.join(VERDICTS)}")
            continue
        seeds = verdict.get("difference", {}).get("n", 0)
        if seeds < MIN_SEEDS:
            problems.append(f"verdict {verdict.get('claim', '?')!r} rests on {seeds} seeds (< {MIN_SEEDS})")
        rule = _rule(verdict.get("rule", {}))
        difference = Summary(**{k: verdict["difference"][k] for k in ("mean", "low", "high", "n")}, values=())
        if rule is not None and rule.verdict(difference) != verdict["verdict"]:
            problems.append(f"verdict {verdict.get('claim', '?')!r} says {verdict['verdict']} but its rule gives "
                            f"{rule.verdict(difference)}")
    if not results.get("verdicts"):
        problems.append("no verdict")
    return problems


def _rule(record: dict):
    if record.get("kind") == "match":
        return MatchRule(float(record["margin"]))
    if record.get("kind") == "better":
        return BetterRule()
    return None


def rule_record(rule) -> dict:
    """How a rule is stored beside its verdict (so ``check_results`` can re-derive the verdict)."""
    if isinstance(rule, MatchRule):
        return {"kind": "match", "margin": rule.margin, "text": rule.describe()}
    return {"kind": "better", "text": rule.describe()}
