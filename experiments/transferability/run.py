"""Transferability of deltas across tasks (Ding et al. 2023, §4.3, Fig. 7), on the study protocol.

A prompt (prompt tuning, the paper's method for this study) is trained on task A's LM-BFF 16-shot split, with its
learning rate from a small grid and its stopping step chosen on the split's own 16-shot dev file (the selection
split); it is then evaluated unchanged on every task B's report split (B's test set, never seen by a choice). The
encoder reads every task through the frozen label-word head of ``deltactl.train.models``, so nothing but δ trains
and on B the same δ is read against B's own label words. Two baselines sit in the matrix: the model without δ
(zero-shot) and a random δ with the trained δ's norm. The five LM-BFF splits are the seeds; every cell is a mean
with a bootstrap interval over them, and the claims are read by the rules stated in README.md before the run.

    python experiments/transferability/run.py --quick
    python experiments/transferability/run.py                  # the full study (resumable)
    python experiments/transferability/run.py --seeds 13,21,42  # only these seeds
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import torch  # noqa: E402

from deltactl.experiments import kshot  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.study import VERDICT_COLOURS, main, mean_std, save_figure, threads, work_dir  # noqa: E402
from deltactl.train import run  # noqa: E402

PAPER = ("Ding et al. 2023, Fig. 7 (prompt tuning, T5-base): relative performance is high between tasks of the "
         "same type (e.g. sentiment) and low across types")
HEAD = kshot.HEAD
ZERO_SHOT = "zero-shot"
TRAINED, RANDOM = "trained", "random δ"


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the setting's seeds to train, evaluate and report")


# -------------------------------------------------------------------------------------------------- training

def train(cfg: dict, task: str, seed: int, lr: float, fitting: dict, folder: Path, data) -> dict:
    """Train δ on (task, seed) with ``lr`` until the selection score stops improving; the record (cached)."""
    return kshot.train_to_plateau(cfg["methods"][0], cfg.get("method_options"), task, seed, lr, cfg["train"],
                                  fitting, folder, data)


def random_like(delta: dict, seed: int, source: str) -> dict:
    """A δ of the same shape and (per tensor) the same Frobenius norm as ``delta``, in a random direction."""
    digest = int(hashlib.sha256(f"{seed}/{source}".encode()).hexdigest()[:12], 16)
    generator = torch.Generator().manual_seed(digest)
    out = {}
    for name, value in sorted(delta.items()):
        direction = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        out[name] = (direction * (value.double().norm() / direction.norm())).to(value.dtype)
    return out


# ------------------------------------------------------------------------------------------------ evaluation

class Evaluator:
    """acc_B(δ) on B's report split, one model per target B (δ swapped in), every result cached on disk."""

    def __init__(self, cfg: dict, report: dict, cache: Path, data):
        self.cfg, self.report, self.data, self.models = cfg, report, data, {}
        self.cache = cache
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        setting = {"report": {t: pr.split_keys(e) for t, e in report.items()}, "train": cfg["train"],
                   "options": cfg.get("method_options"), "method": cfg["methods"][0]}
        self.setting = hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]
        self.values = {}
        # one file per setting, so a run with other report splits never overwrites another setting's cache
        for path in (cache.with_name(f"{cache.stem}-{self.setting}.json"), cache):
            stored = json.loads(path.read_text()) if path.exists() else {}
            if stored.get("setting") == self.setting:
                self.values = stored["values"]
                break
        self.cache = cache.with_name(f"{cache.stem}-{self.setting}.json")

    def __call__(self, name: str, target: str, delta: dict | None) -> float:
        if name in self.values:
            return self.values[name]
        method = run.FULL_FINE_TUNING if delta is None else self.cfg["methods"][0]
        if (method, target) not in self.models:
            _, task_model, _ = run.build(kshot.spec(method, target, self.cfg["seeds"][0], 1e-3, self.cfg["train"],
                                                    self.cfg.get("method_options")), self.data)
            task_model.model.eval()
            self.models[(method, target)] = task_model
        task_model = self.models[(method, target)]
        if delta is not None:
            params = dict(task_model.model.named_parameters())
            with torch.no_grad():
                for key, value in delta.items():
                    params[key].copy_(value)
        with torch.no_grad():
            value = task_model.evaluate(task_model.model, self.report[target], 64)[self.cfg["metric"]]
        self.values[name] = value
        tmp = self.cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"setting": self.setting, "values": self.values}) + "\n")
        os.replace(tmp, self.cache)
        return value


# --------------------------------------------------------------------------------------------------- measure

def measure(cfg: dict, args) -> dict:
    threads()
    # the report split drops what any seed of the setting trains or chooses on, so it is the same whichever of
    # the seeds a run covers (and the cached evaluations stay valid for a run over some of them)
    tasks = [t for group in cfg["groups"].values() for t in group]
    fitting, report, dropped = kshot.splits(tasks, cfg["seeds"], args.data, cfg.get("report_examples"))
    cfg = kshot.only_seeds(cfg, getattr(args, "seeds", None))
    tasks = [t for group in cfg["groups"].values() for t in group]
    work = work_dir("transferability", args)
    evaluate = Evaluator(cfg, report, work / "evaluations.json", args.data)
    zero = {t: evaluate(f"{ZERO_SHOT}|{t}", t, None) for t in tasks}
    cells, runs, train_seconds = [], [], 0.0
    for seed in cfg["seeds"]:
        deltas = {}
        for task in tasks:
            records = {lr: train(cfg, task, seed, lr, fitting, work / "runs" / f"{task}-seed{seed}-lr{lr:g}",
                                 args.data) for lr in cfg["lr_grid"]}
            best, scores = pr.select(cfg["lr_grid"], lambda lr, done=records: done[lr]["selection_accuracy"])
            train_seconds += sum(r["seconds"] for r in records.values())
            runs.append({"task": task, "seed": seed, "lr": best, "selection_scores": {f"{k:g}": v for k, v in
                                                                                     scores.items()},
                         "best_step": records[best]["best_step"], "steps": records[best]["steps"],
                         "status": records[best]["status"]})
            deltas[task] = kshot.best_delta(work / "runs" / f"{task}-seed{seed}-lr{best:g}")
        for source in tasks:
            noise = random_like(deltas[source], seed, source)
            for target in tasks:
                # the random δ only where a claim reads it: the diagonal and the pairs of one type
                rows = ((TRAINED, deltas[source]), (RANDOM, noise)) if same_type(cfg, source, target) else \
                    ((TRAINED, deltas[source]),)
                for row, delta in rows:
                    value = evaluate(f"{row}|{source}|{target}|{seed}", target, delta)
                    cells.append({"method": cfg["methods"][0], "row": row, "seed": seed, "source": source,
                                  "target": target, "metric": cfg["metric"], "value": value})
                    print(f"seed {seed}: {row} {source} → {target} {value:.4f} (zero-shot {zero[target]:.4f})",
                          flush=True)
        for target in tasks:
            cells.append({"method": cfg["methods"][0], "row": ZERO_SHOT, "seed": seed, "source": ZERO_SHOT,
                          "target": target, "metric": cfg["metric"], "value": zero[target]})
    return {"seeds": cfg["seeds"], "paper": PAPER, "head": HEAD, "model": "all-MiniLM-L6-v2",
            "protocol": kshot.protocol_record(fitting, report, dropped, cfg["seeds"]),
            "runs": runs, "cells": cells, "zero_shot": zero,
            "table": table(cells, cfg), "gain": gain_matrix(cells, cfg), "verdicts": verdicts(cells, cfg),
            "matrix": relative(cells, cfg), "summary": by_type(cells, cfg),
            "train_seconds": round(train_seconds, 1)}


def _value(cells: list[dict], row: str, source: str, target: str, seed: int) -> float:
    for c in cells:
        if (c.get("row", TRAINED if c["source"] != ZERO_SHOT else ZERO_SHOT), c["source"], c["target"], c["seed"]) \
                == (row, source, target, seed):
            return c["value"]
    raise KeyError((row, source, target, seed))


def _seeds(cells: list[dict]) -> list:
    return sorted({c["seed"] for c in cells})


def same_type(cfg: dict, a: str, b: str) -> bool:
    group = {t: g for g, members in cfg["groups"].items() for t in members}
    return group[a] == group[b]


def table(cells: list[dict], cfg: dict) -> list[dict]:
    """One row per (row kind, A, B): the accuracy on B's report split, mean and interval over seeds (the random δ
    on the diagonal and the same-type pairs only)."""
    tasks = [t for group in cfg["groups"].values() for t in group]
    rows = []
    for row in (TRAINED, RANDOM, ZERO_SHOT):
        for source in ([ZERO_SHOT] if row == ZERO_SHOT else tasks):
            for target in tasks:
                if row == RANDOM and not same_type(cfg, source, target):
                    continue
                values = [_value(cells, row, source, target, s) for s in _seeds(cells)]
                name = f"{ZERO_SHOT} → {target}" if row == ZERO_SHOT else f"{row} {source} → {target}"
                rows.append({"method": name, "row": row, "source": source, "target": target,
                             "summary": pr.summary(values).to_dict()})
    return rows


def gain_matrix(cells: list[dict], cfg: dict) -> dict:
    """Per row kind: acc_B(δ_A) − acc_B(0), per (A, B), as a summary over seeds (mean, low, high); None where the
    random δ was not evaluated (pairs across types)."""
    tasks = [t for group in cfg["groups"].values() for t in group]
    out = {}
    for row in (TRAINED, RANDOM):
        out[row] = [[pr.paired_summary([_value(cells, row, a, b, s) for s in _seeds(cells)],
                                       [_value(cells, ZERO_SHOT, ZERO_SHOT, b, s) for s in _seeds(cells)]).to_dict()
                     if row == TRAINED or same_type(cfg, a, b) else None for b in tasks] for a in tasks]
    return {"tasks": tasks, **out}


def pairs(cfg: dict, kind: str) -> list[tuple[str, str]]:
    """(A, B) pairs: ``own`` (A = B), ``same`` type (A ≠ B), ``across`` types, or ``within <group>``."""
    group = {t: g for g, members in cfg["groups"].items() for t in members}
    tasks = list(group)
    if kind == "own":
        return [(t, t) for t in tasks]
    if kind == "same":
        return [(a, b) for a in tasks for b in tasks if a != b and group[a] == group[b]]
    if kind == "across":
        return [(a, b) for a in tasks for b in tasks if group[a] != group[b]]
    name = kind.removeprefix("within ")
    return [(a, b) for a in tasks for b in tasks if a != b and group[a] == group[b] == name]


def _mean_difference(cells, pair_list, seed, against) -> float:
    """Mean over pairs of acc_B(δ_A) − acc_B(baseline), the baseline being zero-shot or the random δ of A."""
    diffs = [_value(cells, TRAINED, a, b, seed) - (_value(cells, ZERO_SHOT, ZERO_SHOT, b, seed) if against ==
             ZERO_SHOT else _value(cells, RANDOM, a, b, seed)) for a, b in pair_list]
    return sum(diffs) / len(diffs)


# The claims and rules of README.md, stated before the full run: (id, claim, per-seed quantity).
CLAIMS = (
    ("C0", "(precondition) the trained prompt learns its own task: acc_B(δ_B) − acc_B(0) > 0", "own", ZERO_SHOT),
    ("C1", "within a task type, δ_A transfers to B: acc_B(δ_A) − acc_B(0) > 0", "same", ZERO_SHOT),
    ("C1s", "within sentiment: acc_B(δ_A) − acc_B(0) > 0", "within sentiment", ZERO_SHOT),
    ("C1n", "within NLI: acc_B(δ_A) − acc_B(0) > 0", "within nli", ZERO_SHOT),
    ("C2", "within a task type, δ_A beats a random δ of its norm: acc_B(δ_A) − acc_B(ρ_A) > 0", "same", RANDOM),
    ("C3", "transfer is better within a type than across types: gain over zero-shot, same type − across types",
     "same−across", ZERO_SHOT),
)


def verdicts(cells: list[dict], cfg: dict) -> list[dict]:
    rule, out = pr.BetterRule(), []
    for claim_id, claim, kind, against in CLAIMS:
        if kind == "same−across":
            if not pairs(cfg, "same") or not pairs(cfg, "across"):
                continue
            values = [_mean_difference(cells, pairs(cfg, "same"), s, against)
                      - _mean_difference(cells, pairs(cfg, "across"), s, against) for s in _seeds(cells)]
        else:
            if not pairs(cfg, kind):
                continue  # e.g. a setting with one NLI task has no NLI pair
            values = [_mean_difference(cells, pairs(cfg, kind), s, against) for s in _seeds(cells)]
        difference = pr.summary(values)
        out.append({"id": claim_id, "claim": claim, "pairs": kind, "against": against, "rule": pr.rule_record(rule),
                    "difference": difference.to_dict(), "verdict": rule.verdict(difference)})
    return out


# ------------------------------------------------------------------------- the paper's relative performance

def relative(cells: list[dict], cfg: dict) -> dict:
    """Per method: row and column order and the matrix of mean relative performance metric_B(δ_A) / metric_B(δ_B)
    over seeds (last row: zero-shot); trained cells only."""
    tasks = [t for group in cfg["groups"].values() for t in group]
    out = {}
    for method in cfg["methods"]:
        mine = [c for c in cells if c["method"] == method and c.get("row") in (None, TRAINED, ZERO_SHOT)]
        own = {(c["target"], c["seed"]): c["value"] for c in mine if c["source"] == c["target"]}
        matrix = []
        for source in [*tasks, ZERO_SHOT]:
            row = []
            for target in tasks:
                ratios = [c["value"] / own[(target, c["seed"])] for c in mine
                          if (c["source"], c["target"]) == (source, target) and own[(target, c["seed"])] > 0]
                row.append(mean_std(ratios)[0] if ratios else None)
            matrix.append(row)
        out[method] = {"tasks": tasks, "rows": [*tasks, ZERO_SHOT], "relative": matrix}
    return out


def by_type(cells: list[dict], cfg: dict) -> dict:
    """Per method and kind of pair (same type, across types; A ≠ B): the mean relative performance, and the mean
    gain over the zero-shot model, metric_B(δ_A) − metric_B(0) (descriptive; the verdicts are ``verdicts``)."""
    kind = {t: group for group, members in cfg["groups"].items() for t in members}
    zero = {c["target"]: c["value"] for c in cells if c["source"] == ZERO_SHOT}
    out = {}
    for method, block in relative(cells, cfg).items():
        found: dict[str, dict[str, list]] = {}
        for source, row in zip(block["rows"], block["relative"]):
            for target, value in zip(block["tasks"], row):
                if value is None or source == target:
                    continue
                if source == ZERO_SHOT:
                    keys = [ZERO_SHOT]
                elif kind[source] == kind[target]:
                    keys = ["same type", f"within {kind[source]}"]
                else:
                    keys = ["across types"]
                gains = [c["value"] - zero[target] for c in cells if c.get("row") in (None, TRAINED, ZERO_SHOT)
                         and (c["method"], c["source"], c["target"]) == (method, source, target)]
                for key in keys:
                    found.setdefault(key, {"relative": [], "gain": []})
                    found[key]["relative"].append(value)
                    found[key]["gain"].append(mean_std(gains)[0])
        out[method] = {k: {"relative": round(mean_std(v["relative"])[0], 4), "gain_over_zero_shot":
                           round(mean_std(v["gain"])[0], 4), "pairs": len(v["relative"])} for k, v in found.items()}
    return out


# ------------------------------------------------------------------------------------------------------ plot

def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = payload["gain"]["tasks"]
    fig, axes = plt.subplots(1, 3, figsize=(16.5, 5.2), gridspec_kw={"width_ratios": [1, 1, 1]})
    for ax, row in zip(axes[:2], (TRAINED, RANDOM)):
        grid = payload["gain"][row]
        means = np.array([[np.nan if cell is None else cell["mean"] for cell in line] for line in grid])
        image = ax.imshow(means, vmin=-0.25, vmax=0.25, cmap="RdBu")
        for i, line in enumerate(grid):
            for j, cell in enumerate(line):
                if cell is None:
                    ax.text(j, i, "—", ha="center", va="center", fontsize=7)
                    continue
                ax.text(j, i, f"{cell['mean']:+.3f}\n[{cell['low']:+.3f},\n{cell['high']:+.3f}]", ha="center",
                        va="center", fontsize=6)
        ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xlabel("evaluated on (B), its report split")
        ax.set_ylabel("trained on (A)" if row == TRAINED else "random δ with the norm of δ_A")
        what = "δ_A" if row == TRAINED else "ρ_A (random δ, ‖ρ_A‖ = ‖δ_A‖)"
        ax.set_title(f"acc_B({what}) − acc_B(zero-shot)\nmean [95% CI] over seeds", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    ax = axes[2]
    verdicts_ = payload["verdicts"]
    ys = np.arange(len(verdicts_))[::-1]
    for y, v in zip(ys, verdicts_):
        d = v["difference"]
        color = VERDICT_COLOURS[v["verdict"]]
        ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", color=color,
                    capsize=4)
        ax.plot([d["low"], d["high"]], [y, y], color=color, lw=2)
    ax.axvline(0.0, color="k", lw=0.8)
    labels = [f"{v['id']} {v['pairs']}\nvs {v['against']}: {v['verdict']}" for v in verdicts_]
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlabel("accuracy difference (mean, 95% bootstrap CI over seeds)", fontsize=8)
    ax.set_title("claims (rules in experiments/transferability/README.md)", fontsize=9)
    save_figure(fig, path, f"transferability, prompt tuning on all-MiniLM-L6-v2 ({payload.get('head')} head), "
                           f"16-shot splits as seeds {payload['seeds']}, {payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
