"""Intrinsic dimension across models: d90 with DID (and SAID) (Aghajanyan, Zettlemoyer & Gupta, ACL 2021;
Ding et al. 2023, the intrinsic-dimension study).

For each model of the config and each task: full fine-tuning of the model's weights gives the reference metric;
then, for each d of the grid, DID (θ = θ₀ + P z) and SAID (θ = θ₀ + λ ⊙ P z) train the same weights inside a random
d-dimensional Fastfood subspace for the same number of steps. d90 is the smallest d reaching 90 % of full
fine-tuning. The paper's finding: pre-training lowers the intrinsic dimension, and larger pre-trained models have
a smaller one.

Models: all-MiniLM-L6-v2 with the frozen label-word head of ``deltactl.train.models`` (cosine to the encoder's own
embedding of each label word: nothing trains outside the subspace, and d = 0 is the zero-shot model); the same
architecture from a random initialisation (what pre-training buys); and T5s pre-trained here with span corruption
(``deltactl.train.pretrain.pretrained``, the checkpoints the scale study uses), trained text-to-text and scored
by rank classification. ``exclude`` keeps the word-embedding tables out of both fine-tuning and the subspace (rows
of tokens a small training set never uses, and most of a small model's weights). The Adam learning rate of z is
lr_scale / √d: each step then moves the weights by about lr_scale in norm whatever d is (P has unit columns).

    python experiments/intrinsic_dimension/run.py [--quick | --setting reduced] [--models NAME,…] [--tasks …]
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


def examples(task, cfg):
    """(training examples, evaluation examples): a 16-shot split scored on a sample of its test set, or seeded
    subsets of the full training and dev sets."""
    from deltactl.experiments.finetune import subset

    if cfg.get("kshot_seed") is not None:
        rng = random.Random(cfg["seed"])
        return (rng.sample(task.train, min(cfg["train_examples"], len(task.train))),
                rng.sample(task.test, min(cfg["eval_examples"], len(task.test))))
    return subset(task.train, cfg["train_examples"]), subset(task.dev, cfg["eval_examples"])


def load(entry: dict, task_name: str, cfg: dict, args):
    """(task, task model, train, eval) for one model entry of the config."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    from deltactl.tasks import get_task
    from deltactl.train.models import classifier, text_to_text
    from deltactl.train.pretrain import PretrainConfig, pretrained
    from deltactl.train.run import default_model_path

    task = get_task(task_name, data=args.data, kshot_seed=cfg.get("kshot_seed"))
    train, dev = examples(task, cfg)
    if "t5" in entry:
        fields = {**cfg["pretrain"], "size": entry["t5"]}
        quick = study.work_dir("intrinsic_dimension", args) / f"t5-{entry['t5']}" if study.mode(args) == "quick" \
            else None
        folder, _ = pretrained(PretrainConfig(**fields), quick, data=args.data)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, attn_implementation="eager", local_files_only=True)
        return task, text_to_text(task, model, tokenizer, cfg["max_length"]), train, dev
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if entry.get("random_init"):
        torch.manual_seed(cfg["seed"])
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(path), attn_implementation="eager")
    else:
        encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
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


def run_one(entry: dict, task_name: str, cfg: dict, args) -> dict:
    from deltactl.subspace import d90_from_curve, intrinsic

    task, tm, train, dev = load(entry, task_name, cfg, args)
    model = tm.model
    with torch.no_grad():
        model.eval()
        zero_shot = tm.evaluate(model, dev, 100)[task.main_metric]
    lr_scale = entry.get("lr_scale", cfg["lr_scale"])
    curves = {}
    for method in cfg["methods"]:
        metrics = []
        for d in cfg["dims"]:
            start = time.perf_counter()
            sub = intrinsic(model, d, said=method == "SAID", seed=cfg["seed"], exclude=tuple(cfg["exclude"]))
            metric = train_and_score(sub, sub.trainable(), tm, train, dev, task, cfg, lr_scale / math.sqrt(d))
            sub.detach()
            metrics.append(metric)
            print(f"{entry['name']} {task_name} {method} d={d}: {task.main_metric} {metric:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        curves[method] = metrics
    # Full fine-tuning last: it changes the weights in place.
    trainable = {n: p for n, p in model.named_parameters() if not any(fnmatchcase(n, e) for e in cfg["exclude"])}
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
    full = train_and_score(model, trainable, tm, train, dev, task, cfg, entry.get("ft_lr", cfg["ft_lr"]))
    print(f"{entry['name']} {task_name} full fine-tuning: {full:.4f}; zero-shot {zero_shot:.4f}", flush=True)
    return {"metric": task.main_metric, "zero_shot": zero_shot, "full": full,
            "parameters": sum(p.numel() for p in model.parameters()),
            "D": sum(p.numel() for p in trainable.values()), "train_examples": len(train), "eval_examples": len(dev),
            "curves": {m: d90_from_curve(cfg["dims"], v, full).to_dict() for m, v in curves.items()},
            **learning(zero_shot, full, len(dev), cfg["dims"], curves)}


def learning(zero_shot: float, full: float, n: int, dims: list, curves: dict) -> dict:
    """Whether full fine-tuning learned anything, and d90 of the gain over zero-shot.

    d90 as the paper defines it (90 % of full fine-tuning's metric) is meaningful only where fine-tuning beat the
    zero-shot model: a model that learns nothing has every d "reach 90 %" of a chance-level metric. ``learned``
    asks for a gain above two standard errors of an accuracy on ``n`` examples (2·√(0.25/n)); ``gain_d90`` is
    then the smallest d closing 90 % of the gap zero-shot → full (None where nothing was learned).
    """
    from deltactl.subspace import d90_from_curve

    learned = full - zero_shot > 2 * math.sqrt(0.25 / n)
    gain = {m: d90_from_curve(dims, [x - zero_shot for x in v], full - zero_shot).d90 if learned else None
            for m, v in curves.items()}
    return {"learned": learned, "gain_d90": gain}


def plot(results, path):
    """One panel per task: the metric against d, one colour per model (solid DID, dashed SAID), its full
    fine-tuning as a dotted line and its zero-shot metric as a cross at the left."""
    import matplotlib

    from deltactl.subspace import D90Result

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    tasks = list(dict.fromkeys(t for m in models.values() for t in m["tasks"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        for i, (model, block) in enumerate(models.items()):
            res = block["tasks"].get(name)
            if res is None:
                continue
            for method, curve in res["curves"].items():
                c = D90Result(**curve)
                if res.get("learned", True):
                    gain = res.get("gain_d90", {}).get(method)
                    note = f"d90 {c.d90 or '> ' + str(c.dims[-1])}, of the gain {gain or '> ' + str(c.dims[-1])}"
                else:
                    note = "fine-tuning ≈ zero-shot: no d90"
                ax.plot(c.dims, c.metrics, "o-" if method == "DID" else "s--", color=f"C{i}",
                        label=f"{model} {method} (D {res['D']:,}): {note}")
            ax.axhline(res["full"], color=f"C{i}", ls=":", lw=1)
            ax.plot([c.dims[0] / 3], [res["zero_shot"]], "x", color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("subspace dimension d (× at the left: d = 0, zero-shot; dotted: full fine-tuning)")
        ax.set_ylabel(res["metric"])
        ax.set_title(name)
        ax.legend(fontsize=6)
    study.save_figure(fig, path, f"intrinsic dimension across models, {results['mode']} setting")


def main(argv=None):
    parser = study.parser(__doc__.split("\n")[0])  # the flags every study shares
    parser.add_argument("--tasks", help="comma-separated subset of the config's tasks (each adds its results to an "
                        "existing results.json of the same mode, so runs can go in parallel)")
    parser.add_argument("--models", help="comma-separated subset of the config's model names")
    args = parser.parse_args(argv)
    started = study.begin(HERE, args, plot)
    if started is None:  # --plot-only: the figure is redrawn
        return
    mode, out, cfg = started
    entries = {e["name"]: e for e in cfg["models"]}
    names = args.tasks.split(",") if args.tasks else cfg["tasks"]
    chosen = args.models.split(",") if args.models else list(entries)
    for flag, given, valid in (("--tasks", names, cfg["tasks"]), ("--models", chosen, list(entries))):
        unknown = [n for n in given if n not in valid]
        if unknown:
            raise SystemExit(f"{flag}: {unknown[0]!r} is not among this mode's {valid}")
    study.threads()
    torch.manual_seed(cfg["seed"])
    for model in chosen:
        for name in names:
            start = time.perf_counter()
            result = run_one(entries[model], name, cfg, args)
            result["seconds"] = round(time.perf_counter() - start, 1)
            results = merge(out / "results.json", mode, cfg, model, name, result)
    plot(results, out / "figure.png")
    print(f"wrote {out / 'results.json'} and figure.png")


def merge(path: Path, mode: str, cfg: dict, model: str, name: str, result: dict) -> dict:
    """Add one (model, task) result to results.json (kept only if it holds the same mode and config)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("mode") != mode or results.get("config") != cfg:
        results = {"mode": mode, "config": cfg, "environment": study.environment(), "models": {}}
    results["models"].setdefault(model, {"tasks": {}})["tasks"][name] = result
    results["seconds"] = sum(r["seconds"] for m in results["models"].values() for r in m["tasks"].values())
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(main())
