"""Robust prefix-tuning against text attacks: accuracy of P_θ and of P_θ + ψ (per-batch robust prefix).

For each task and seed: train a prefix with the project's trainer (a seeded subsample of the train set, see
config.json), build the canonical manifolds from correctly classified training examples (not those it trained on
first: the next ``manifold_examples`` of the same shuffle), search a universal trigger per class on the plain
prefix model (training examples again), then score the first ``eval_examples`` dev examples clean and attacked,
with and without the robust prefix, and time both.

    python experiments/robust_prefix/run.py [--quick] [--out DIR] [--data DIR] [--plot-only] [--seeds 0 1]

Each (task, seed) result is kept in ``OUT/per_run/`` with the settings it used and reused while they match, so an
interrupted full run resumes (and ``--seeds`` runs a subset; the summary covers every kept seed of the config).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prefixes import prefix_model  # noqa: E402

from deltactl.experiments import study  # noqa: E402
from deltactl.inference import RobustPrefix, fit_manifold  # noqa: E402
from deltactl.inference.attacks import insert_trigger, perturb, universal_trigger, word_vocabulary  # noqa: E402

CONDITIONS = ("clean", "typo", "drop", "swap", "trigger")


def batches(collate, examples, size):
    for start in range(0, len(examples), size):
        batch = collate(examples[start:start + size])
        labels = batch.pop("labels")
        yield batch, labels


def attacked(examples, kind, rate, seed):
    texts = perturb([e.text_a for e in examples], kind, rate, seed)
    return [replace(e, text_a=t) for e, t in zip(examples, texts)]


def score(task_model, robust, examples, size, trigger_of=None):
    """Accuracy without and with the robust prefix, and the seconds each took (triggers inserted per class)."""
    correct = {"plain": 0, "robust": 0}
    seconds = {"plain": 0.0, "robust": 0.0}
    for batch, labels in batches(task_model.collate, examples, size):
        if trigger_of is not None:  # one trigger per true class, as in the paper: group the batch by class
            groups = [(labels == c) for c in trigger_of]
        else:
            groups = [torch.ones_like(labels, dtype=torch.bool)]
        for rows in groups:
            if not rows.any():
                continue
            sub = {k: v[rows] for k, v in batch.items()}
            if trigger_of is not None:
                sub = insert_trigger(sub, trigger_of[int(labels[rows][0])])
            start = time.perf_counter()
            with torch.no_grad():
                plain = task_model.model(**sub)
            seconds["plain"] += time.perf_counter() - start
            start = time.perf_counter()
            tuned = robust(**sub).outputs
            seconds["robust"] += time.perf_counter() - start
            correct["plain"] += (plain.argmax(-1) == labels[rows]).sum().item()
            correct["robust"] += (tuned.argmax(-1) == labels[rows]).sum().item()
    n = len(examples)
    return {k: correct[k] / n for k in correct}, {k: round(v, 2) for k, v in seconds.items()}


def one_run(task_name, seed, cfg, runs, data, tokenizer):
    started = time.perf_counter()
    task, task_model, delta, record = prefix_model(task_name, seed, cfg["train"], runs, data)
    if len(task.labels) != 2:
        raise ValueError(f"the trigger attack here targets the other class of a binary task; {task_name} is not")
    clf = task_model.model
    shuffled = list(task.train)
    random.Random(seed).shuffle(shuffled)
    first = cfg["train"]["train_examples"]
    held = shuffled[first:first + cfg["manifold_examples"]]
    manifold = fit_manifold(delta, batches(task_model.collate, held, cfg["batch_size"]), clf)
    robust = RobustPrefix(delta, manifold, clf, **cfg["robust"])

    trig_cfg = cfg["attacks"]["trigger"]
    vocab = word_vocabulary(tokenizer)
    embeddings = delta.backbone.input_embeddings()
    triggers = {}
    for c in range(len(task.labels)):
        of_class = [e for e in held if task.label_index(e) == c][: trig_cfg["examples"]]
        search = list(batches(task_model.collate, of_class, cfg["batch_size"]))
        triggers[c] = universal_trigger(
            clf, embeddings, search, target=1 - c, length=trig_cfg["length"], vocabulary=vocab,
            init_id=tokenizer.convert_tokens_to_ids("the"), iterations=trig_cfg["iterations"],
            candidates=trig_cfg["candidates"],
        )

    dev = list(task.dev)[: cfg["eval_examples"]]
    accuracy, seconds = {}, {}
    for condition in CONDITIONS:
        if condition == "clean":
            accuracy[condition], seconds[condition] = score(task_model, robust, dev, cfg["batch_size"])
        elif condition == "trigger":
            accuracy[condition], seconds[condition] = score(task_model, robust, dev, cfg["batch_size"], triggers)
        else:
            examples = attacked(dev, condition, cfg["attacks"]["rate"], seed)
            accuracy[condition], seconds[condition] = score(task_model, robust, examples, cfg["batch_size"])
        print(f"{task_name} seed {seed} {condition:8s} plain {accuracy[condition]['plain']:.3f} "
              f"robust {accuracy[condition]['robust']:.3f}", flush=True)
    delta.detach()
    return {
        "task": task_name, "seed": seed, "training": record,
        "manifold": {"examples": manifold.examples, "seen": manifold.seen,
                     "ranks": [s.rank for s in manifold.layers]},
        "triggers": {task.labels[c]: tokenizer.convert_ids_to_tokens(t.tolist()) for c, t in triggers.items()},
        "accuracy": accuracy, "seconds": seconds, "wall_s": round(time.perf_counter() - started, 1),
    }


def summarise(runs_out):
    summary = {}
    for task in sorted({r["task"] for r in runs_out}):
        rows = [r for r in runs_out if r["task"] == task]
        summary[task] = {}
        for condition in CONDITIONS:
            entry = {}
            for kind in ("plain", "robust"):
                values = torch.tensor([r["accuracy"][condition][kind] for r in rows], dtype=torch.float64)
                std = values.std().item() if len(values) > 1 else 0.0
                entry[kind] = {"mean": round(values.mean().item(), 4), "std": round(std, 4)}
            summary[task][condition] = entry
        plain = sum(r["seconds"][c]["plain"] for r in rows for c in CONDITIONS)
        tuned = sum(r["seconds"][c]["robust"] for r in rows for c in CONDITIONS)
        summary[task]["robust_over_plain_time"] = round(tuned / plain, 2)
    return summary


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["summary"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        s = results["summary"][task]
        x = torch.arange(len(CONDITIONS)).float()
        for k, (kind, label) in enumerate((("plain", "prefix P_θ"), ("robust", "robust P_θ + ψ"))):
            means = [s[c][kind]["mean"] for c in CONDITIONS]
            stds = [s[c][kind]["std"] for c in CONDITIONS]
            ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3, label=label)
        ax.set_xticks(x, CONDITIONS)
        ax.set_ylim(0, 1)
        seeds = len({r["seed"] for r in results["runs"] if r["task"] == task})
        ax.set_title(f"{task}: dev accuracy ({seeds} seed{'s' * (seeds > 1)})")
        ax.legend(loc="lower left", fontsize=8)
    study.save_figure(fig, path)


def main(argv=None):
    parser = study.parser(__doc__.splitlines()[0])  # the flags every study shares
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these seeds of the config")
    args = parser.parse_args(argv)
    started = study.begin(HERE, args, plot)
    if started is None:  # --plot-only: the figure is redrawn
        return
    mode, out, cfg = started
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    from transformers import AutoTokenizer

    from deltactl.train.run import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    started = time.perf_counter()
    runs = HERE / "runs" if not args.quick else out / "runs"
    kept = out / "per_run"
    kept.mkdir(exist_ok=True)
    results_runs = []
    for task in cfg["tasks"]:
        for seed in cfg["seeds"][task]:
            file = kept / f"{task}-seed{seed}.json"
            stored = json.loads(file.read_text()) if file.exists() else None
            if stored is not None and stored["config"] == cfg:
                results_runs.append(stored["result"])
            elif args.seeds is None or seed in args.seeds:
                result = one_run(task, seed, cfg, runs, args.data, tokenizer)
                file.write_text(json.dumps({"config": cfg, "result": result}, indent=1) + "\n")
                results_runs.append(result)
    if not results_runs:
        raise SystemExit("no (task, seed) has been run yet with these settings")
    results = {"mode": mode, "config": cfg, "runs": results_runs, "summary": summarise(results_runs),
               "wall_s": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "figure.png")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
