"""Generalisation gap of delta tuning against full fine-tuning (Ding et al. 2023, §4.1, Fig. 4), on the study
protocol.

The runs are the performance study's (``experiments/performance``): its ``measure`` runs here on the same setting,
from the same cache, so nothing is trained twice (and whatever is missing is trained). Each chosen run's best δ
was scored on the 16-shot training file it was trained on and on the task's report split; the gap is
train − report accuracy. The claims are read by the rules stated in README.md before the run.

    python experiments/generalisation_gap/run.py --quick
    python experiments/generalisation_gap/run.py     # the full study (after or instead of the performance one)
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.runner import load_script  # noqa: E402
from deltactl.experiments.study import main, plot_verdicts, save_figure, settings  # noqa: E402

PAPER = ("Ding et al. 2023, Fig. 4 (T5-base): delta tuning and FT both fit the training data; the generalisation "
         "gap (train − dev) of delta-tuning methods is smaller than that of FT")
PERFORMANCE = HERE.parent / "performance"
DELTA = ("lora", "adapter", "prefix", "prompt", "bitfit")


def performance_study():
    """experiments/performance/run.py as a module (its measure, per_seed and labels)."""
    return load_script("performance", HERE.parent)


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the performance setting's seeds")
    p.add_argument("--keep-runs", metavar="RESULTS_JSON",
                   help="an earlier results.json of the performance study: the runs it holds are read as they are, "
                        "instead of being trained again")


def measure(cfg: dict, args) -> dict:
    performance = performance_study()
    setting = settings(PERFORMANCE, cfg["performance_setting"])
    shared = performance.measure(setting, args)  # its cache under the performance study's work folder
    runs = [{**r, "gap": r["train_accuracy"] - r["report_accuracy"]} for r in shared["runs"]]
    rows = [{k: r[k] for k in ("method", "task", "seed", "lr", "train_accuracy", "report_accuracy", "gap",
                               "best_step", "steps")} for r in runs]
    return {"seeds": shared["seeds"], "paper": PAPER, "head": shared["head"], "model": shared["model"],
            "performance_setting": cfg["performance_setting"], "performance_config": setting,
            "protocol": shared["protocol"], **{k: shared[k] for k in ("kept_runs",) if k in shared},
            "rows": rows, "table": table(runs, setting, performance),
            "verdicts": verdicts(runs, setting, performance), "compute_seconds": shared["compute_seconds"]}


def table(runs, setting, performance) -> list[dict]:
    rows = []
    for quantity in ("gap", "train_accuracy", "report_accuracy"):
        for task in [*setting["tasks"], "mean"]:
            for method in setting["methods"]:
                values = performance.per_seed(runs, method, quantity, None if task == "mean" else [task])
                rows.append({"method": method, "task": task, "quantity": quantity,
                             "summary": pr.summary(values).to_dict()})
    return rows


# The claims and rules of README.md, stated before the full run: (id, claim, the methods whose mean gap FT's is
# compared with)
CLAIMS = (
    ("G0", "delta tuning's gap is smaller than FT's", DELTA),
    ("G1", "LoRA's gap is smaller than FT's", ("lora",)),
    ("G2", "adapter's gap is smaller than FT's", ("adapter",)),
    ("G3", "prefix-tuning's gap is smaller than FT's", ("prefix",)),
    ("G4", "prompt tuning's gap is smaller than FT's", ("prompt",)),
    ("G5", "BitFit's gap is smaller than FT's", ("bitfit",)),
)


def verdicts(runs, setting, performance) -> list[dict]:
    rule, out = pr.BetterRule(), []
    ft = performance.per_seed(runs, performance.FT, "gap")
    for claim_id, claim, methods in CLAIMS:
        present = [m for m in methods if m in setting["methods"]]
        if performance.FT not in setting["methods"] or not present:
            continue  # e.g. the quick setting runs only some methods
        gaps = [performance.per_seed(runs, m, "gap") for m in present]
        delta = [sum(values) / len(values) for values in zip(*gaps)]
        difference = pr.paired_summary(ft, delta)
        out.append({"id": claim_id, "claim": claim, "methods": present, "rule": pr.rule_record(rule),
                    "difference": difference.to_dict(), "verdict": rule.verdict(difference)})
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = performance_study().LABELS
    rows = payload["table"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.0 * (len(tasks) + 1), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        width = 0.38
        for k, quantity in enumerate(("train_accuracy", "report_accuracy")):
            cells = [next(r["summary"] for r in rows if (r["quantity"], r["task"], r["method"]) ==
                          (quantity, task, m)) for m in methods]
            xs = [i + (k - 0.5) * width for i in range(len(methods))]
            ax.bar(xs, [c["mean"] for c in cells], width, label=quantity.replace("_accuracy", ""),
                   yerr=[[c["mean"] - c["low"] for c in cells], [c["high"] - c["mean"] for c in cells]], capsize=2)
        gaps = [next(r["summary"] for r in rows if (r["quantity"], r["task"], r["method"]) == ("gap", task, m))
                for m in methods]
        for i, gap in enumerate(gaps):
            ax.text(i, 1.02, f"{gap['mean']:+.2f}", ha="center", fontsize=6)
        ax.set_xticks(range(len(methods)), [labels.get(m, m) for m in methods])
        ax.set_ylim(0.3, 1.08)
        ax.set_title(f"{task}: best δ on train vs report, mean [95% CI]\n(gap above the bars)", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    plot_verdicts(axes[0][-1], payload["verdicts"], "gap(FT) − gap(delta), mean over tasks, 95% CI over seeds")
    save_figure(fig, path, f"generalisation gap, all-MiniLM-L6-v2 ({payload.get('head')} head), 16-shot splits as "
                           f"seeds {payload['seeds']}, {payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
