"""The power of scale (Ding et al. 2023, §4.2, Fig. 6): delta methods against FT as the model grows.

T5 models of several sizes are pre-trained here with span corruption on the training texts of the data folder
(``deltactl pretrain-t5``; a checkpoint with the same pre-training settings is reused), then every method trains
on each of them text-to-text (verbalised labels, rank classification) within one budget; all-MiniLM-L6-v2 (a real
pre-trained encoder, classifier head) is the largest well-trained point. The paper (T5 small → XXL): the gap
between delta tuning and FT shrinks as the model grows; at XXL even prompt tuning matches FT.

    python experiments/scale/run.py --quick
    python experiments/scale/run.py --setting reduced
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments.finetune import Budget, run_budgeted  # noqa: E402
from deltactl.experiments.study import cache_root, main, mean_std, mode, save_figure, threads, work_dir  # noqa: E402
from deltactl.train.pretrain import PretrainConfig, pretrained  # noqa: E402

LABELS = {"ft": "FT", "prompt": "PT", "prefix": "PF", "lora": "LR", "adapter": "AP", "bitfit": "BF"}
PAPER = ("Ding et al. 2023, Fig. 6 (T5-small, -base, -XXL): the performance of delta tuning approaches FT as "
         "the model grows; at T5-XXL all methods, prompt tuning included, come close to FT")


def checkpoint(size: str, cfg: dict, args) -> tuple[str, dict]:
    """A pre-trained T5 of ``size``: reused when its pretrain.json has the same settings, else pre-trained now.

    Quick mode keeps its tiny checkpoints in the study's work folder; other settings use the default
    ``~/.cache/deltactl/t5-SIZE`` folders, which ``deltactl pretrain-t5`` and the intrinsic-dimension study share.
    """
    fields = dict(cfg["pretrain"], size=size)
    if "tasks" in fields:
        fields["tasks"] = tuple(fields["tasks"])
    folder = work_dir("scale", args) / f"t5-{size}" if mode(args) == "quick" else None
    folder, record = pretrained(PretrainConfig(**fields), folder, data=args.data)
    return str(folder), record


def measure(cfg: dict, args) -> dict:
    threads()
    budget = Budget(**cfg["budget"])
    work = work_dir("scale", args)
    models = {}
    for size in cfg["t5_sizes"]:
        folder, record = checkpoint(size, cfg, args)
        losses = [record["log"][0]["held_out_loss"], record["log"][-1]["held_out_loss"]]
        models[f"t5-{size}"] = {"path": folder, "parameters": record["parameters"],
                                "pretrain_seconds": record["seconds"], "held_out_loss_start_end": losses}
    if cfg["include_minilm"]:
        models["all-MiniLM-L6-v2"] = {"path": None, "parameters": 22_713_216}
    rows = []
    for seed in cfg["seeds"]:
        for name, model in models.items():
            for task in cfg["tasks"]:
                for method in cfg["methods"]:
                    folder = work / f"{name}-{task}-{method}-seed{seed}"
                    shared = cache_root() / "experiments" / "performance" / mode(args) / f"{task}-{method}-seed{seed}"
                    if model["path"] is None and (shared / "result.json").exists():
                        folder = shared  # the performance study's MiniLM run (reused only if its budget matches)
                    record = run_budgeted(method, task, seed, budget, folder, data=args.data, model=model["path"])
                    metric = record["main_metric"]
                    dev = record["best"].get("dev", {}).get(metric, float("nan"))
                    rows.append({"model": name, "parameters": model["parameters"], "task": task, "method": method,
                                 "seed": seed, "metric": metric, "dev": dev,
                                 "trainable": record["trainable_parameters"], "seconds": record["seconds"]})
                    print(f"{name} {task} {method} seed {seed}: dev {metric} {dev:.4f}", flush=True)
    compute = sum(r["seconds"] for r in rows) + sum(m.get("pretrain_seconds", 0) for m in models.values())
    return {"seeds": cfg["seeds"], "paper": PAPER, "models": models, "rows": rows, "summary": summarise(rows),
            "compute_seconds": round(compute, 1)}  # pre-training and every run, reused ones with their own time


def summarise(rows: list[dict]) -> dict:
    """Per task, model and method: mean dev metric and its difference to FT on the same model."""
    out = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        out[task] = {}
        for model in dict.fromkeys(r["model"] for r in rows):
            cell = {}
            for method in dict.fromkeys(r["method"] for r in rows):
                group = [r["dev"] for r in rows if (r["task"], r["model"], r["method"]) == (task, model, method)]
                if group:
                    mean, std = mean_std(group)
                    cell[method] = {"dev": mean, "dev_std": std}
            for value in cell.values():
                value["minus_ft"] = value["dev"] - cell["ft"]["dev"] if "ft" in cell else None
            out[task][model] = cell
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    summary, models = payload["summary"], payload["models"]
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        names = sorted(summary[task], key=lambda m: models[m]["parameters"])
        methods = list(dict.fromkeys(m for name in names for m in summary[task][name]))
        for method in methods:
            pts = [(models[n]["parameters"], summary[task][n][method]["dev"])
                   for n in names if method in summary[task][n]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=LABELS.get(method, method))
        for n in names:
            ax.annotate(n, (models[n]["parameters"], ax.get_ylim()[0]), fontsize=6, rotation=90, va="bottom")
        ax.set_xscale("log")
        ax.set_xlabel("model parameters")
        ax.set_ylabel("best dev metric")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path, f"scale, {payload['mode']} setting, seeds {payload['seeds']}")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot))
