"""d90 of all-MiniLM-L6-v2 on real tasks, DID vs SAID (Aghajanyan, Zettlemoyer & Gupta, ACL 2021).

For each task (its LM-BFF 16-shot training split, scored on a sample of its test set): full fine-tuning of the
encoder gives the reference metric; then, for each d of the grid, DID and SAID train the same weights inside
a random d-dimensional Fastfood subspace
(θ = θ₀ + (λ ⊙) P z) for the same number of steps. The head is the frozen label-word head of
``deltactl.train.models`` (cosine to the encoder's own embedding of each label word), so nothing trains outside
the subspace and d = 0 is the zero-shot model. ``exclude`` (config) keeps the word-embedding table out of
both, fine-tuning and subspace alike: half of MiniLM's 22.7M weights, rows of tokens a 16-shot set never uses,
and half the projection's cost. d90 is the smallest d reaching 90% of full fine-tuning.
The Adam learning rate of z is lr_scale / √d: each step then moves the weights by about lr_scale in norm
whatever d is (P has unit columns).

    python experiments/intrinsic_dimension/run.py [--quick] [--out DIR] [--data DIR] [--plot-only]
"""

from __future__ import annotations

import json
import math
import random
import sys
import tempfile
import time
from fnmatch import fnmatchcase
from pathlib import Path

import torch

from deltactl.experiments import study

HERE = Path(__file__).resolve().parent


def load(task_name, cfg, data):
    from transformers import AutoModel, AutoTokenizer

    from deltactl.tasks import get_task
    from deltactl.train.models import classifier
    from deltactl.train.run import default_model_path

    task = get_task(task_name, data=data, kshot_seed=cfg["kshot_seed"])  # the LM-BFF 16-shot split
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    rng = random.Random(cfg["seed"])
    train = rng.sample(task.train, min(cfg["train_examples"], len(task.train)))
    dev = rng.sample(task.test, min(cfg["eval_examples"], len(task.test)))  # scored on a sample of the test set
    return task, classifier(task, encoder, tokenizer, cfg["max_length"], head="label_words"), train, dev


def train_and_score(model, trainable, tm, train, dev, task, cfg, lr):
    """``fit`` for cfg["steps"] steps with one evaluation at the end; returns the dev metric."""
    from deltactl.train.loop import TrainConfig, fit

    epochs = cfg["steps"] * cfg["batch_size"] / len(train)
    config = TrainConfig(lr=lr, epochs=epochs, batch_size=cfg["batch_size"], eval_every=cfg["steps"], warmup=0.1,
                         seed=cfg["seed"])
    evaluate = lambda: tm.evaluate(model, dev, 100)  # noqa: E731
    with tempfile.TemporaryDirectory() as out:
        outcome = fit(model, trainable, train, tm.collate, tm.loss, evaluate, task.main_metric, config, out,
                      lambda _: None)
    return outcome.best_metric


def run_task(task_name, cfg, data) -> dict:
    from deltactl.subspace import d90_from_curve, intrinsic

    task, tm, train, dev = load(task_name, cfg, data)
    model = tm.model
    with torch.no_grad():
        model.eval()
        zero_shot = tm.evaluate(model, dev, 100)[task.main_metric]
    curves = {}
    for method in cfg["methods"]:
        metrics = []
        for d in cfg["dims"]:
            start = time.perf_counter()
            sub = intrinsic(model, d, said=method == "SAID", seed=cfg["seed"], exclude=tuple(cfg["exclude"]))
            metric = train_and_score(sub, sub.trainable(), tm, train, dev, task, cfg, cfg["lr_scale"] / math.sqrt(d))
            sub.detach()
            metrics.append(metric)
            print(f"{task_name} {method} d={d}: {task.main_metric} {metric:.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        curves[method] = metrics
    # Full fine-tuning last: it changes the encoder's weights in place.
    for p in model.parameters():
        p.requires_grad_(True)
    trainable = {n: p for n, p in model.named_parameters() if not any(fnmatchcase(n, e) for e in cfg["exclude"])}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    full = train_and_score(model, trainable, tm, train, dev, task, cfg, cfg["ft_lr"])
    print(f"{task_name} full fine-tuning: {full:.4f}; zero-shot {zero_shot:.4f}", flush=True)
    results = {"metric": task.main_metric, "zero_shot": zero_shot, "full": full,
               "D": sum(p.numel() for p in trainable.values()), "train_examples": len(train), "eval_examples": len(dev),
               "curves": {}}
    for method, metrics in curves.items():
        results["curves"][method] = d90_from_curve(cfg["dims"], metrics, full).to_dict()
    return results


def plot(results, path):
    """One panel per task: metric against d for DID and SAID, with full fine-tuning, its 90% and zero-shot."""
    import matplotlib

    from deltactl.subspace import D90Result

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False)
    for ax, (name, res) in zip(axes[0], tasks.items()):
        for i, (method, curve) in enumerate(res["curves"].items()):
            c = D90Result(**curve)
            ax.plot(c.dims, c.metrics, "o-", color=f"C{i}", label=f"{method} (d90 {c.d90 or '> ' + str(c.dims[-1])})")
        ax.axhline(res["full"], color="k", ls="--", lw=1, label="full fine-tuning")
        ax.axhline(0.9 * res["full"], color="k", ls=":", lw=1, label="90% of it")
        ax.axhline(res["zero_shot"], color="grey", ls="-.", lw=1, label="d = 0 (zero-shot)")
        ax.set_xscale("log")
        ax.set_xlabel("subspace dimension d")
        ax.set_ylabel(res["metric"])
        ax.set_title(f"{name}: MiniLM, D = {res['D']:,}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = study.parser(__doc__.split("\n")[0])  # the flags every study shares
    parser.add_argument("--tasks", help="comma-separated subset of the config's tasks (runs can then go in parallel; "
                        "each adds its tasks to an existing results.json of the same mode)")
    args = parser.parse_args(argv)
    started = study.begin(HERE, args, plot)
    if started is None:  # --plot-only: the figure is redrawn
        return
    mode, out, cfg = started
    names = args.tasks.split(",") if args.tasks else cfg["tasks"]
    unknown = [n for n in names if n not in cfg["tasks"]]
    if unknown:
        raise SystemExit(f"--tasks: {unknown[0]!r} is not among this mode's tasks {cfg['tasks']}")
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()
    for name in names:
        result = run_task(name, cfg, args.data)
        result["seconds"] = time.perf_counter() - start
        results = merge(out / "results.json", mode, cfg, name, result)
    plot(results, out / "figure.png")
    print(f"wrote {out / 'results.json'} and figure.png in {time.perf_counter() - start:.0f} s")


def merge(path: Path, mode: str, cfg: dict, name: str, result: dict) -> dict:
    """Add one task's result to results.json (kept only if it holds the same mode and config)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("mode") != mode or results.get("config") != cfg:
        results = {"mode": mode, "config": cfg, "threads": torch.get_num_threads(), "tasks": {}}
    results["tasks"][name] = result
    results["seconds"] = sum(r["seconds"] for r in results["tasks"].values())  # CPU-parallel runs: summed
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
