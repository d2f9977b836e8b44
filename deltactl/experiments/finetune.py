"""Budgeted training runs for studies: a method on a fixed subset of a task, a fixed number of steps.

The paper's runs (Ding et al. 2023, T5-base, thousands of steps per task) do not fit on two CPU cores; a study
states its budget instead — how many training and dev examples (a fixed, seeded subset: every method and seed
sees the same examples), the batch size and the number of steps — and every method gets exactly that budget.
A run goes through the library's own pieces: :func:`deltactl.train.run.resolve` (the method's tuned learning
rate), :func:`deltactl.train.run.build` and :func:`deltactl.train.loop.fit`; afterwards the best δ is scored on
the training subset and the dev subset, so the generalisation gap (train − dev) comes from the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltactl.train import run
from deltactl.train.loop import fit

SUBSET_SEED = 0  # the subset is the same for every method and run seed: seeds vary initialisation and order only


@dataclass(frozen=True)
class Budget:
    """What one run may use: ``train_examples``/``dev_examples`` (None: all), ``steps`` of ``batch_size``."""

    steps: int
    batch_size: int = 16
    eval_every: int = 20
    train_examples: int | None = None
    dev_examples: int | None = None
    max_length: int = 128

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"budget {name} must be a positive integer, got {getattr(self, name)!r}")


def subset(examples: list, n: int | None, seed: int = SUBSET_SEED) -> list:
    """The first ``n`` examples of a seeded permutation (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(examples):
        return list(examples)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [examples[i] for i in order[:n]]


def weights_digest(folder) -> str:
    """SHA-256 of a checkpoint folder's weight files (safetensors or bin), in name order."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no weights (*.safetensors or *.bin)")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def epochs_for(steps: int, n_train: int, batch_size: int) -> float:
    """The ``epochs`` value for which the loop runs exactly ``steps`` steps (it runs ceil(epochs·steps/epoch))."""
    per_epoch = math.ceil(n_train / batch_size)
    return (steps - 0.5) / per_epoch


def run_budgeted(
    method: str, task: str, seed: int, budget: Budget, out, data=None, model: str | None = None,
    method_options: dict | None = None, keep_weights: bool = False, head: str = "linear", template: bool = False,
) -> dict:
    """Train ``method`` on ``task`` within ``budget``; returns (and stores as ``out/result.json``) the record.

    The record holds the evaluation log (metric vs step), the outcome, the number of trainable parameters and
    the best δ's metrics on the training subset and the dev subset. A finished run with the same settings in
    ``out`` is reused, so an interrupted study resumes where it stopped. ``head`` is the encoder's head
    (``deltactl.train.models``): with ``label_words`` nothing but δ trains, so δ alone carries the task;
    ``template`` makes a T5 read the task through its manual template (``deltactl.tasks.templates``).
    """
    out = Path(out)
    key = {"method": method, "task": task, "seed": seed, "budget": asdict(budget), "model": model,
           "method_options": method_options or {}}
    if model:  # the checkpoint's weights, not only its folder: a folder re-trained in place must not be reused
        key["weights"] = weights_digest(model)
    for name, value, default in (("head", head, "linear"), ("template", template, False)):
        if value != default:  # recorded only when set, so the records of earlier runs stay valid
            key[name] = value
    stored, started_key = out / "result.json", out / "key.json"
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return json.loads(stored.read_text())
    if out.exists() and (not started_key.exists() or json.loads(started_key.read_text()) != key):
        shutil.rmtree(out)  # another run's folder: its checkpoint must not be resumed into this one
    out.mkdir(parents=True, exist_ok=True)
    started_key.write_text(json.dumps(key) + "\n")
    started = time.perf_counter()
    spec = run.resolve(
        method, task, {"batch_size": budget.batch_size, "eval_every": budget.eval_every, "seed": seed, "epochs": 1.0},
        method_options=method_options, model=model, max_length=budget.max_length, head=head,
        template=template,
    )
    task_obj, task_model, delta = run.build(spec, data)
    train_set = subset(task_obj.train, budget.train_examples)
    dev_set = subset(task_obj.dev, budget.dev_examples)
    spec = replace(spec, train=replace(spec.train, epochs=epochs_for(budget.steps, len(train_set), budget.batch_size)))
    trainable = run.trainable_parameters(task_model)
    eval_batch = max(budget.batch_size, 64)

    def save_best(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
        save_file(tensors, str(folder / "trainable.safetensors"))

    outcome = fit(
        task_model.model, trainable, train_set, task_model.collate, task_model.loss,
        lambda: task_model.evaluate(task_model.model, dev_set, eval_batch), task_obj.main_metric,
        spec.train, out, save_best,
    )
    best = {}
    if (out / "best" / "trainable.safetensors").exists():
        with torch.no_grad():
            for name, value in load_file(str(out / "best" / "trainable.safetensors")).items():
                trainable[name].copy_(value)
        task_model.model.eval()
        with torch.no_grad():
            # the train metric on as many training examples as the dev set has (all of them if fewer): the
            # same sample size on both sides of the gap, and no full pass over a large training set
            seen = subset(train_set, len(dev_set), seed=SUBSET_SEED + 1)
            best = {split: task_model.evaluate(task_model.model, examples, eval_batch)
                    for split, examples in (("train", seen), ("dev", dev_set))}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line]
    record = {
        "key": key, "method": method, "task": task, "seed": seed, "main_metric": task_obj.main_metric,
        "lr": spec.train.lr, "train_examples": len(train_set), "dev_examples": len(dev_set),
        "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "outcome": asdict(outcome), "best": best, "log": log, "seconds": round(time.perf_counter() - started, 1),
    }
    if not keep_weights:  # full fine-tuning's checkpoint is hundreds of MB per run: keep only the record
        for folder in ("checkpoint", "best"):
            shutil.rmtree(out / folder, ignore_errors=True)
    stored.write_text(json.dumps(record, indent=1) + "\n")
    return record
