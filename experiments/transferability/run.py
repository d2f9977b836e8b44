"""Transferability of deltas across tasks (Ding et al. 2023, §4.3, Fig. 7).

A delta and its classifier head are trained on task A, then evaluated as they are (zero-shot) on task B. A
classifier head maps to A's label indices, so only pairs whose labels mean the same thing in the same order are
evaluated: the groups of config.json — sentiment (sst2, mr, cr, mpqa: 0 negative, 1 positive), NLI with two
classes (rte, qnli: entailment, not_entailment) and paraphrase (mrpc: not_equivalent/equivalent, qqp:
not_duplicate/duplicate). Pairs across groups would need a verbaliser-based (text-to-text) model and are left
empty rather than scored through a head that means something else. The matrix entry is the relative
performance metric_B(δ_A) / metric_B(δ_B) with B's main metric. The paper (prompt tuning, T5-base): deltas
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
from deltactl.experiments.study import main, mean_std, threads, work_dir  # noqa: E402
from deltactl.tasks import get_task  # noqa: E402
from deltactl.tasks.registry import SPECS, resolve_name  # noqa: E402
from deltactl.train import run  # noqa: E402

PAPER = ("Ding et al. 2023, Fig. 7 (prompt tuning, T5-base): relative performance is high between tasks of the "
         "same type (e.g. sentiment) and low across types")


def check_groups(groups: dict) -> None:
    """Every group's tasks must have the same number of classes (their label i means the same thing)."""
    for name, tasks in groups.items():
        sizes = {t: len(SPECS[resolve_name(t)].labels) for t in tasks}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(f"group {name!r} mixes tasks with different label sets {sizes}; a group holds "
                             "classification tasks whose labels align one to one")


def score(method: str, source_folder: Path, target: str, budget: Budget, data) -> dict:
    """Metrics on ``target``'s dev subset of the δ + head kept in ``source_folder/best``."""
    spec = run.resolve(method, target, {"batch_size": budget.batch_size}, max_length=budget.max_length)
    task, task_model, _ = run.build(spec, data)
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(source_folder / "best" / "trainable.safetensors")).items():
            params[name].copy_(value)
    task_model.model.eval()
    with torch.no_grad():
        return task_model.evaluate(task_model.model, subset(task.dev, budget.dev_examples), 64)


def measure(cfg: dict, args) -> dict:
    threads()
    check_groups(cfg["groups"])
    budget = Budget(**cfg["budget"])
    work = work_dir("transferability", args)
    cells, trained = [], 0.0
    for seed in cfg["seeds"]:
        for method in cfg["methods"]:
            for group, tasks in cfg["groups"].items():
                folders = {}
                for source in tasks:
                    folders[source] = work / f"{source}-{method}-seed{seed}"
                    record = run_budgeted(method, source, seed, budget, folders[source], data=args.data,
                                          keep_weights=True)
                    trained += record["seconds"]
                for source in tasks:
                    for target in tasks:
                        metric = get_task(target, data=args.data).main_metric
                        value = score(method, folders[source], target, budget, args.data)[metric]
                        cells.append({"group": group, "method": method, "seed": seed, "source": source,
                                      "target": target, "metric": metric, "value": value})
                        print(f"{method} seed {seed}: {source} → {target} {metric} {value:.4f}", flush=True)
    return {"seeds": cfg["seeds"], "paper": PAPER, "cells": cells, "matrix": relative(cells, cfg),
            "compute_seconds": round(trained, 1)}  # the training runs (reused ones with their own time)


def relative(cells: list[dict], cfg: dict) -> dict:
    """Per method: the task order and the matrix of mean relative performance (None across groups)."""
    tasks = [t for group in cfg["groups"].values() for t in group]
    out = {}
    for method in cfg["methods"]:
        mine = [c for c in cells if c["method"] == method]
        own = {(c["target"], c["seed"]): c["value"] for c in mine if c["source"] == c["target"]}
        matrix = []
        for source in tasks:
            row = []
            for target in tasks:
                ratios = [c["value"] / own[(target, c["seed"])] for c in mine
                          if (c["source"], c["target"]) == (source, target) and own[(target, c["seed"])] > 0]
                row.append(mean_std(ratios)[0] if ratios else None)
            matrix.append(row)
        out[method] = {"tasks": tasks, "relative": matrix}
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    methods = list(payload["matrix"])
    fig, axes = plt.subplots(1, len(methods), figsize=(5.0 * len(methods), 4.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        tasks = payload["matrix"][method]["tasks"]
        values = np.array([[np.nan if v is None else v for v in row] for row in payload["matrix"][method]["relative"]])
        image = ax.imshow(values, vmin=0, vmax=1.2, cmap="viridis")
        for i in range(len(tasks)):
            for j in range(len(tasks)):
                text = "—" if np.isnan(values[i, j]) else f"{values[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_xlabel("evaluated on (B)")
        ax.set_ylabel("trained on (A)")
        ax.set_title(f"{method}: metric_B(δ_A) / metric_B(δ_B)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"transferability, all-MiniLM-L6-v2, {payload['mode']} setting, seeds {payload['seeds']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot))
