"""Transferability of deltas across tasks (Ding et al. 2023, §4.3, Fig. 7).

A delta is trained on task A, then evaluated as it is (zero-shot) on task B. The encoder reads every task
through the frozen label-word head of ``deltactl.train.models`` (logits_c = τ·cos(pooled sentence, embedding of
class c's verbaliser word)): nothing but δ trains, so δ carries the whole task, and on B the same δ is read
against B's own label words ("positive"/"negative", "entailment"/"not entailment", "equivalent"/...). Every pair
is therefore scored, across task types too, as in the paper's text-to-text setting. The matrix entry is the
relative performance metric_B(δ_A) / metric_B(δ_B); an extra row gives the zero-shot model (δ = 0) the same way,
so a transfer can be told apart from what the head does on its own. The paper (prompt tuning, T5-base): deltas
transfer well between tasks of the same type (sentiment ↔ sentiment), poorly across types.

    python experiments/transferability/run.py --quick
    python experiments/transferability/run.py --setting reduced
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from deltactl.experiments.finetune import Budget, run_budgeted, subset  # noqa: E402
from deltactl.experiments.study import main, mean_std, save_figure, threads, work_dir  # noqa: E402
from deltactl.train import run  # noqa: E402

PAPER = ("Ding et al. 2023, Fig. 7 (prompt tuning, T5-base): relative performance is high between tasks of the "
         "same type (e.g. sentiment) and low across types")
HEAD = "label_words"
ZERO_SHOT = "zero-shot"


def score(method: str, source_folder: Path | None, target: str, budget: Budget, data, metric: str) -> float:
    """``metric`` on ``target``'s dev subset of the δ kept in ``source_folder/best`` (None: the model without δ)."""
    spec = run.resolve(method if source_folder else run.FULL_FINE_TUNING, target, {"batch_size": budget.batch_size},
                       max_length=budget.max_length, head=HEAD)
    task, task_model, _ = run.build(spec, data)
    if source_folder is not None:
        params = dict(task_model.model.named_parameters())
        with torch.no_grad():
            for name, value in load_file(str(source_folder / "best" / "trainable.safetensors")).items():
                params[name].copy_(value)
    task_model.model.eval()
    with torch.no_grad():
        return task_model.evaluate(task_model.model, subset(task.dev, budget.dev_examples), 64)[metric]


def measure(cfg: dict, args) -> dict:
    threads()
    budget = Budget(**cfg["budget"])
    tasks = [t for group in cfg["groups"].values() for t in group]
    metric = cfg["metric"]
    work = work_dir("transferability", args)
    cells, trained = [], 0.0
    zero_shot = {t: score("", None, t, budget, args.data, metric) for t in tasks}
    for seed in cfg["seeds"]:
        for method in cfg["methods"]:
            folders = {}
            for source in tasks:
                folders[source] = work / f"{source}-{method}-{HEAD}-seed{seed}"
                record = run_budgeted(method, source, seed, budget, folders[source], data=args.data,
                                      keep_weights=True, head=HEAD)
                trained += record["seconds"]
            for source in [*tasks, ZERO_SHOT]:
                for target in tasks:
                    value = zero_shot[target] if source == ZERO_SHOT else score(
                        method, folders[source], target, budget, args.data, metric)
                    cells.append({"method": method, "seed": seed, "source": source, "target": target,
                                  "metric": metric, "value": value})
                    print(f"{method} seed {seed}: {source} → {target} {metric} {value:.4f}", flush=True)
    return {"seeds": cfg["seeds"], "paper": PAPER, "head": HEAD, "cells": cells, "zero_shot": zero_shot,
            "matrix": relative(cells, cfg), "summary": by_type(cells, cfg),
            "compute_seconds": round(trained, 1)}  # the training runs (reused ones with their own time)


def relative(cells: list[dict], cfg: dict) -> dict:
    """Per method: row and column order and the matrix of mean relative performance (last row: zero-shot)."""
    tasks = [t for group in cfg["groups"].values() for t in group]
    out = {}
    for method in cfg["methods"]:
        mine = [c for c in cells if c["method"] == method]
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
    gain over the zero-shot model, metric_B(δ_A) − metric_B(0), which tells a transfer from what the label-word
    head does without any δ."""
    kind = {t: group for group, members in cfg["groups"].items() for t in members}
    zero = {c["target"]: c["value"] for c in cells if c["source"] == ZERO_SHOT}
    out = {}
    for method, block in relative(cells, cfg).items():
        pairs: dict[str, dict[str, list]] = {}
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
                gains = [c["value"] - zero[target] for c in cells
                         if (c["method"], c["source"], c["target"]) == (method, source, target)]
                for key in keys:
                    pairs.setdefault(key, {"relative": [], "gain": []})
                    pairs[key]["relative"].append(value)
                    pairs[key]["gain"].append(mean_std(gains)[0])
        out[method] = {k: {"relative": round(mean_std(v["relative"])[0], 4), "gain_over_zero_shot":
                           round(mean_std(v["gain"])[0], 4), "pairs": len(v["relative"])} for k, v in pairs.items()}
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(payload["matrix"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5.0 * len(methods), 4.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        tasks = payload["matrix"][method]["tasks"]
        rows = payload["matrix"][method].get("rows", tasks)
        values = np.array([[np.nan if v is None else v for v in row] for row in payload["matrix"][method]["relative"]])
        image = ax.imshow(values, vmin=0, vmax=1.2, cmap="viridis")
        for i in range(len(rows)):
            for j in range(len(tasks)):
                text = "—" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlabel("evaluated on (B)")
        ax.set_ylabel("trained on (A)")
        ax.set_title(f"{method}: metric_B(δ_A) / metric_B(δ_B)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    head = payload.get("head", "linear")
    save_figure(fig, path, f"transferability, all-MiniLM-L6-v2 ({head} head)\n{payload['mode']} setting, "
                           f"seeds {payload['seeds']}")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot))
