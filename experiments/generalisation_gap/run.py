"""Generalisation gap of delta tuning against full fine-tuning (Ding et al. 2023, §4.1, Fig. 4).

For each (task, method, seed) the best δ (by dev metric) is scored on training examples it was trained on and on
the dev set; the gap is train − dev. A run of the performance study with the same task, method, seed, budget and
model is reused as it is (its work folder under ~/.cache/deltactl/experiments/performance/SETTING/); any missing
run is trained here. The paper (T5-base, 100+ tasks): FT and delta tuning memorise the training set alike, but
delta tuning generalises better, i.e. its train − dev gap is smaller than FT's.

    python experiments/generalisation_gap/run.py --quick
    python experiments/generalisation_gap/run.py --setting reduced
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments.finetune import Budget, run_budgeted  # noqa: E402
from deltactl.experiments.study import cache_root, main, mean_std, save_figure, threads, work_dir  # noqa: E402

LABELS = {"ft": "FT", "prompt": "PT", "prefix": "PF", "lora": "LR", "adapter": "AP", "bitfit": "BF"}
PAPER = ("Ding et al. 2023, Fig. 4 (T5-base): delta tuning and FT both fit the training data; the generalisation "
         "gap (train - dev) of delta-tuning methods is smaller than that of FT")


def measure(cfg: dict, args) -> dict:
    threads()
    budget = Budget(**cfg["budget"])
    shared = cache_root() / "experiments" / "performance" / cfg["performance_setting"]
    own = work_dir("generalisation_gap", args)
    rows = []
    for seed in cfg["seeds"]:
        for task in cfg["tasks"]:
            for method in cfg["methods"]:
                name = f"{task}-{method}-seed{seed}"
                # the performance study's folder when it holds this very run (run_budgeted checks the settings)
                folder = shared / name if (shared / name / "result.json").exists() else own / name
                record = run_budgeted(method, task, seed, budget, folder, data=args.data)
                metric = record["main_metric"]
                train, dev = record["best"]["train"][metric], record["best"]["dev"][metric]
                rows.append({"task": task, "method": method, "seed": seed, "metric": metric, "train": train,
                             "dev": dev, "gap": train - dev, "best_step": record["outcome"]["best_step"],
                             "reused": folder.parent == shared, "seconds": record["seconds"]})
                print(f"{name}: train {train:.4f} dev {dev:.4f} gap {train - dev:+.4f}", flush=True)
    return {"seeds": cfg["seeds"], "paper": PAPER, "rows": rows, "summary": summarise(rows),
            "compute_seconds": round(sum(r["seconds"] for r in rows), 1)}  # reused runs count with their own time


def summarise(rows: list[dict]) -> dict:
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        out[task] = {}
        for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            group = [r for r in rows if r["task"] == task and r["method"] == method]
            (train, train_sd), (dev, dev_sd), (gap, gap_sd) = (
                mean_std([r[k] for r in group]) for k in ("train", "dev", "gap"))
            out[task][method] = {"train": train, "train_std": train_sd, "dev": dev, "dev_std": dev_sd,
                                 "gap": gap, "gap_std": gap_sd, "runs": len(group)}
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = list(summary[task])
        x = range(len(methods))
        width = 0.38
        ax.bar([i - width / 2 for i in x], [summary[task][m]["train"] for m in methods], width, label="train",
               yerr=[summary[task][m]["train_std"] for m in methods], capsize=2)
        ax.bar([i + width / 2 for i in x], [summary[task][m]["dev"] for m in methods], width, label="dev",
               yerr=[summary[task][m]["dev_std"] for m in methods], capsize=2)
        for i, m in enumerate(methods):
            top = max(summary[task][m]["train"], summary[task][m]["dev"])
            ax.text(i, top + 0.02, f"{summary[task][m]['gap']:+.3f}", ha="center", fontsize=7)
        ax.set_xticks(list(x), [LABELS.get(m, m) for m in methods])
        ax.set_ylim(0, 1.1)
        ax.set_title(f"{task}: best δ on train vs dev (gap above the bars)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"generalisation gap, all-MiniLM-L6-v2, {payload['mode']} setting, seeds {payload['seeds']}",
                 fontsize=9)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot))
