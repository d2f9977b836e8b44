"""Train (or reload) the prefix P_θ of one (task, seed) with the project's trainer, on a subsample of the train set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltactl.train.loop import TrainConfig, fit
from deltactl.train.run import build, resolve, trainable_parameters


def prefix_model(task: str, seed: int, settings: dict, runs: Path, data=None):
    """(task, task model, prefix delta, training record): trained once into ``runs``, reloaded afterwards.

    The prefix is deltactl's default (20 rows per layer through the 512-wide MLP) on all-MiniLM-L6-v2; it trains
    on the first ``train_examples`` of a seeded shuffle of the train set for ``epochs`` epochs, evaluated once on
    dev set (its first ``dev_examples`` when given) at the end, which keeps that final δ.
    """
    train = TrainConfig(lr=settings["lr"], epochs=settings["epochs"], batch_size=settings["batch_size"],
                        eval_every=10**9, seed=seed)
    spec = resolve("prefix", task, train_options={**train.__dict__}, max_length=settings["max_length"])
    task_obj, task_model, delta = build(spec, data)
    trainable = trainable_parameters(task_model)
    folder = Path(runs) / f"{task}-seed{seed}-n{settings['train_examples']}"
    best = folder / "best.safetensors"
    record_file = folder / "record.json"
    if not (best.exists() and record_file.exists()):
        examples = list(task_obj.train)
        random.Random(seed).shuffle(examples)
        examples = examples[: settings["train_examples"]]
        dev = list(task_obj.dev)[: settings.get("dev_examples") or None]

        def save_best(_folder):
            folder.mkdir(parents=True, exist_ok=True)
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(best))

        outcome = fit(
            task_model.model, trainable, examples, task_model.collate, task_model.loss,
            lambda: task_model.evaluate(task_model.model, dev, 64), task_obj.main_metric, spec.train,
            folder / "train", save_best,
        )
        record = {"train_examples": len(examples), "dev_examples": len(dev), "dev_metric": outcome.best_metric,
                  "steps": outcome.steps, "seconds": round(outcome.seconds, 1), "status": outcome.status}
        record_file.write_text(json.dumps(record, indent=1) + "\n")
    record = json.loads(record_file.read_text())
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(best)).items():
            params[name].copy_(value)
    task_model.model.eval()
    return task_obj, task_model, delta, record
