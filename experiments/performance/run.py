"""Performance and convergence of delta-tuning methods against full fine-tuning (Ding et al. 2023, §4.1).

Every method trains within one budget (the same examples, batch size and number of steps) at its own tuned
learning rate; each run logs the dev metric every ``eval_every`` steps, which gives the metric-vs-step curves.
Per (task, method) the summary holds the best dev metric (mean ± std over seeds) and a convergence score, the
mean of the dev curve over its evaluations (the normalised area under the curve: higher means better sooner).
The paper's findings on T5-base: performance FT > LR > AP > PF > PT; convergence FT > AP ≈ LR > PF (PT slowest).

    python experiments/performance/run.py --quick        # CI: one task, one seed, a few steps
    python experiments/performance/run.py --setting reduced
    python experiments/performance/run.py                # the full study
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments.finetune import Budget, run_budgeted  # noqa: E402
from deltactl.experiments.study import main, mean_std, save_figure, threads, work_dir  # noqa: E402

LABELS = {"ft": "FT", "prompt": "PT", "prefix": "PF", "lora": "LR", "adapter": "AP", "bitfit": "BF"}
PAPER = {
    "performance_order": ["ft", "lora", "adapter", "prefix", "prompt"],
    "convergence_order": ["ft", "adapter", "lora", "prefix", "prompt"],
    "source": "Ding et al. 2023, Nature Machine Intelligence, 'Performance, convergence and efficiency' (T5-base, "
              "100+ NLP tasks): average performance FT > LR > AP > PF > PT; convergence FT > AP ≈ LR > PF, PT slowest",
}
RUN_FIELDS = ("method", "task", "seed", "main_metric", "lr", "train_examples", "dev_examples",
              "trainable_parameters", "outcome", "best", "log", "seconds")


def measure(cfg: dict, args) -> dict:
    threads()
    budget = Budget(**cfg["budget"])
    work = work_dir("performance", args)
    runs = []
    for seed in cfg["seeds"]:  # seed outermost: an interrupted study already holds every method at the first seeds
        for task in cfg["tasks"]:
            for method in cfg["methods"]:
                record = run_budgeted(method, task, seed, budget, work / f"{task}-{method}-seed{seed}", data=args.data)
                runs.append({k: record[k] for k in RUN_FIELDS})
                dev = record["best"].get("dev", {}).get(record["main_metric"], float("nan"))
                print(f"{task} {method} seed {seed}: best dev {record['main_metric']} {dev:.4f} "
                      f"({record['seconds']:.0f} s)", flush=True)
    return {"seeds": cfg["seeds"], "work_dir": str(work), "paper": PAPER, "runs": runs, "summary": summarise(runs),
            "compute_seconds": round(sum(r["seconds"] for r in runs), 1)}  # reused runs count with their own time


def curve_score(log: list[dict], metric: str) -> float:
    """Mean dev metric over the run's evaluations: the area under its dev curve divided by its length."""
    return sum(entry[metric] for entry in log) / len(log)


def summarise(runs: list[dict]) -> dict:
    """Per task and method: best dev (mean, std), final-train metric, curve score; and the ranks over tasks."""
    table: dict[str, dict[str, dict]] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        table[task] = {}
        for method in dict.fromkeys(r["method"] for r in runs if r["task"] == task):
            group = [r for r in runs if r["task"] == task and r["method"] == method]
            metric = group[0]["main_metric"]
            dev = mean_std([r["best"]["dev"][metric] for r in group])
            train = mean_std([r["best"]["train"][metric] for r in group])
            score = mean_std([curve_score(r["log"], metric) for r in group])
            table[task][method] = {
                "metric": metric, "dev_mean": dev[0], "dev_std": dev[1], "train_mean": train[0],
                "train_std": train[1], "curve_mean": score[0], "curve_std": score[1], "runs": len(group),
                "trainable_parameters": group[0]["trainable_parameters"],
                "seconds_mean": sum(r["seconds"] for r in group) / len(group),
            }
    methods = list(dict.fromkeys(r["method"] for r in runs))
    average = {m: sum(table[t][m]["dev_mean"] for t in table) / len(table) for m in methods}
    curve = {m: sum(table[t][m]["curve_mean"] for t in table) / len(table) for m in methods}
    return {
        "table": table, "average_dev": average, "average_curve": curve,
        "performance_order": sorted(methods, key=lambda m: -average[m]),
        "convergence_order": sorted(methods, key=lambda m: -curve[m]),
    }


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs, table = payload["runs"], payload["summary"]["table"]
    tasks = list(table)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, row in table[task].items():
            group = [r for r in runs if r["task"] == task and r["method"] == method]
            steps = [e["step"] for e in group[0]["log"]]
            n = min(len(r["log"]) for r in group)  # early-stopped or diverged runs log fewer points
            mean = [sum(r["log"][i][row["metric"]] for r in group) / len(group) for i in range(n)]
            ax.plot(steps[:n], mean, marker="o", ms=3,
                    label=f"{LABELS.get(method, method)} {row['dev_mean']:.3f}±{row['dev_std']:.3f}")
        ax.set_title(f"{task} ({table[task][next(iter(table[task]))]['metric']}, dev)")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="best dev, mean±std", title_fontsize=7)
    save_figure(fig, path, f"performance and convergence, all-MiniLM-L6-v2, {payload['mode']} setting, "
                           f"seeds {payload['seeds']}")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot))
