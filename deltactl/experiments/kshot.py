"""Few-shot runs on the study protocol: train δ on an LM-BFF 16-shot split until its dev file stops improving.

Shared by the studies that use the 16-shot tasks (transferability, performance, generalisation gap). Seed s is the
LM-BFF split ``16-s``: its ``train`` file trains, its ``dev`` file is the *selection* split (learning rate and
stopping step are chosen on it), and the task's test set is the *report* split. The encoder reads every task
through the frozen label-word head (``deltactl.train.models``), so nothing but δ trains and a comparison of
methods is a comparison of their δ.

A run is cached in its folder (``result.json``, keyed by everything that defines it); a folder holding another
setting's run is cleared rather than resumed into this one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file, save_file

from deltactl.control import registry
from deltactl.control.io import write_atomic
from deltactl.experiments import protocol as pr
from deltactl.experiments.finetune import subset
from deltactl.tasks import get_task
from deltactl.train import run
from deltactl.train.loop import fit, read_log

HEAD = "label_words"
REPORT_SEED = 0  # the seeded subset of a large test set: the same for every split seed
BEST = "trainable.safetensors"


def splits(tasks, seeds, data, report_examples: int | None) -> tuple[dict, dict, dict]:
    """(train and selection splits by (task, seed), report split by task, dropped report examples by task).

    A test example whose text and label also occur in a train or dev file of any task and seed is dropped from
    the report split (SST-2 and MR share Rotten Tomatoes sentences); the rest is a seeded subset of at most
    ``report_examples``, the same whichever seeds a run covers."""
    fitting, report, dropped = {}, {}, {}
    for task in tasks:
        for seed in seeds:
            loaded = get_task(task, data=data, kshot_seed=seed)
            fitting[(task, seed)] = {"train": loaded.train, "dev": loaded.dev}
    seen = {pr.example_key(e) for s in fitting.values() for e in s["train"] + s["dev"]}
    for task in tasks:
        test = get_task(task, data=data, kshot_seed=seeds[0]).test  # the same file in every split folder
        clean = [e for e in test if pr.example_key(e) not in seen]
        dropped[task] = len(test) - len(clean)
        report[task] = subset(clean, report_examples, seed=REPORT_SEED)
    used = [e for s in fitting.values() for e in s["train"] + s["dev"]]
    pr.check_disjoint(used, [e for examples in report.values() for e in examples])
    return fitting, report, dropped


def spec(method: str, task: str, seed: int, lr: float, train: dict, options: dict | None, epochs: float = 1.0,
         model: str | None = None, after: Path | None = None):
    """The run spec: ``train`` holds batch_size, eval_every, patience and max_length; ``options`` the method's (for
    a combination such as ``prompt+bitfit``, each part's by its name); ``model`` a checkpoint folder (default: the
    package's all-MiniLM-L6-v2); ``after`` the folder of an earlier stage whose δ stays attached and frozen."""
    if method == run.FULL_FINE_TUNING:
        options = None
    elif "+" in method:
        options = {name: _seeded(name, (options or {}).get(name), seed) or {} for name in method.split("+")}
    else:
        options = _seeded(method, options, seed)
    extra = {**({"model": str(model)} if model else {}), **({"after": str(after)} if after else {})}
    return run.resolve(method, task, {"batch_size": train["batch_size"], "eval_every": train["eval_every"],
                                      "seed": seed, "epochs": epochs, "patience": train["patience"], "lr": lr},
                       method_options=options, max_length=train["max_length"], head=HEAD, kshot_seed=seed, **extra)


def _seeded(method: str, options: dict | None, seed: int) -> dict | None:
    """A method with a random init (prompt rows, modules) follows the split seed."""
    if "seed" in {f.name for f in dataclasses.fields(registry.get(method).config)}:
        return {**(options or {}), "seed": seed}
    return options


def train_to_plateau(method: str, options: dict | None, task: str, seed: int, lr: float, train: dict,
                     fitting: dict, folder: Path, data, model: str | None = None, after: Path | None = None) -> dict:
    """Train δ on (task, seed) with ``lr`` until the selection score stops improving (``train["patience"]``
    evaluations without a gain, at most ``train["max_epochs"]``); the record, cached in ``folder/result.json``.
    The best δ is in ``folder/best/trainable.safetensors`` and the spec in ``folder/run.json``, so a later stage
    can continue this one (``after``: an earlier stage's folder, its δ attached and frozen; the run's key holds
    the earlier stage's key and δ's hash, so a changed earlier stage retrains this one); ``curve`` is the selection
    accuracy at every evaluation. ``model``: a checkpoint folder other than the default backbone."""
    key = {"task": task, "seed": seed, "lr": lr, "method": method, "options": options, "train": train,
           **({"model": str(model)} if model else {})}
    if after is not None:
        stored = Path(after) / "result.json"
        if not stored.exists():
            raise FileNotFoundError(f"{stored} is missing: train the earlier stage before the one that continues it")
        # the earlier stage's key and its δ itself: a stage retrained under the same key (say after a fix to the
        # trainer) gives this stage another key, so it is never reused on top of a δ it was not trained on
        key["after"] = {"key": json.loads(stored.read_text())["key"], "delta": file_digest(Path(after) / "best" / BEST)}
    with folder_lock(folder):  # two studies sharing runs (scale reads the performance study's) wait for each other
        return _train_to_plateau(key, method, options, task, seed, lr, train, fitting, folder, data, model, after)


@contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive lock beside ``folder`` (the folder itself may be removed and remade) for the block; a
    second process asking for it waits until the first is done."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield


def _train_to_plateau(key, method, options, task, seed, lr, train, fitting, folder, data, model, after) -> dict:
    def prepare():
        run_spec = spec(method, task, seed, lr, train, options, epochs=float(train["max_epochs"]), model=model,
                        after=after)
        write_json(folder / "run.json", run_spec.to_dict())  # what a later stage restores (run.read_spec)
        _, task_model, _ = run.build_deltas(run_spec, data)
        return task_model.model, run.trainable_parameters(task_model), task_model, run_spec.train

    return plateau(key, folder, prepare, fitting[(task, seed)]["train"], fitting[(task, seed)]["dev"],
                   {"task": task, "seed": seed, "lr": lr, "method": method})


def plateau(key: dict, folder: Path, prepare, train_set: list, dev_set: list, fields: dict) -> dict:
    """A cached run to a plateau: ``prepare()`` gives (model, trainable, task model, TrainConfig); training stops
    when the selection accuracy on ``dev_set`` stops improving (the config's patience). The record (``fields``,
    the selection accuracy and step, the curve, the size of δ, the seconds) is cached in ``folder/result.json``
    under ``key``; a folder holding another key's run is cleared, never resumed into this one. The best δ is
    ``folder/best/trainable.safetensors``."""
    stored = folder / "result.json"
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return json.loads(stored.read_text())
    if folder.exists() and (not (folder / "key.json").exists() or json.loads((folder / "key.json").read_text()) != key):
        shutil.rmtree(folder)  # another setting's run: never resume it into this one
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(key) + "\n")
    started = time.perf_counter()
    model, trainable, task_model, config = prepare()

    def save_best(best: Path):
        best.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()}, str(best / BEST))

    outcome = fit(model, trainable, train_set, task_model.collate, task_model.loss,
                  lambda: task_model.evaluate(model, dev_set, 64), "accuracy", config, folder, save_best)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    curve = [{"step": e["step"], "accuracy": e["accuracy"]} for e in read_log(folder / "log.jsonl")
             if "accuracy" in e]
    record = {"key": key, **fields, "selection_accuracy": outcome.best_metric, "best_step": outcome.best_step,
              "steps": outcome.steps, "status": outcome.status, "curve": curve,
              "trainable_parameters": sum(p.numel() for p in trainable.values()),
              "seconds": round(time.perf_counter() - started, 1)}
    write_json(stored, record)
    return record


def file_digest(path: Path) -> str:
    """A content hash of a file (the first 16 hex digits of its SHA-256)."""
    import hashlib

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing: the earlier stage kept no best δ (or it was pruned); rerun it")
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def best_delta(folder: Path) -> dict:
    """The best δ a run kept (``train_to_plateau``)."""
    path = Path(folder) / "best" / BEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run kept no best δ (or it was pruned); rerun it")
    return load_file(str(path))


def selection_score(record: dict) -> float:
    """A run's selection accuracy; −1 for a run that diverged before its first evaluation (it kept no δ, so it loses
    to any run that has a score)."""
    return -1.0 if record["selection_accuracy"] is None else record["selection_accuracy"]


def choose_lr(grid, records: dict, what: str) -> tuple:
    """(best lr, scores by lr): the grid's run with the best selection accuracy (``protocol.select``, ties to the
    earlier lr). Every run having diverged before its first evaluation is an error naming ``what`` ran."""
    best, scores = pr.select(grid, lambda lr: selection_score(records[lr]))
    if records[best]["selection_accuracy"] is None:
        raise ValueError(f"{what}: every learning rate of {list(grid)} diverged before its first evaluation; give "
                         "it a gentler grid in config.json")
    return best, scores


def score_best(run_spec, folder: Path, data, sets: dict) -> dict:
    """Accuracy of a run's best δ (restored into a model built from ``run_spec``, earlier stages included) on each
    named example list of ``sets``."""
    import torch

    _, task_model, _ = run.build_deltas(run_spec, data)
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in best_delta(folder).items():
            params[name].copy_(value)
    task_model.model.eval()
    with torch.no_grad():
        return {split: task_model.evaluate(task_model.model, examples, 64)["accuracy"]
                for split, examples in sets.items()}


def write_json(path: Path, value) -> None:
    """Write JSON atomically (``control.io.write_atomic``): a kill leaves the old file or the new one, never half of
    one, and each process writes through a temporary name of its own."""
    write_atomic(path, json.dumps(value, indent=1) + "\n")


def only_seeds(cfg: dict, text: str | None) -> dict:
    """The setting with its seeds narrowed to ``text`` (``--seeds 13,21,42``); unknown seeds are an error."""
    if not text:
        return cfg
    try:
        wanted = [int(s) for s in text.split(",") if s]
    except ValueError as err:
        raise ValueError(f"--seeds {text!r} is not a comma-separated list of integers (e.g. 13,21,42)") from err
    unknown = sorted(set(wanted) - set(cfg["seeds"]))
    if unknown:
        raise ValueError(f"--seeds {text}: {unknown} not among the setting's seeds {cfg['seeds']}")
    return {**cfg, "seeds": [s for s in cfg["seeds"] if s in wanted]}


def protocol_record(fitting: dict, report: dict, dropped: dict, seeds) -> dict:
    """The ``protocol`` record of a 16-shot study's results: both splits' content keys (the seeds' dev files
    against every task's report split), what they are, and the report sizes."""
    return {"selection": pr.split_keys([e for (_, seed), s in fitting.items() if seed in seeds for e in s["dev"]]),
            "report": pr.split_keys([e for examples in report.values() for e in examples]),
            "selection_split": "each split's 16-shot dev file",
            "report_split": "the task's test set (seeded subset of report_examples where larger)",
            "report_sizes": {t: len(e) for t, e in report.items()}, "report_dropped_as_seen": dropped}
