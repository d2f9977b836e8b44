"""The training loop: AdamW, warm-up + linear decay, periodic evaluation, best-δ keeping, early stopping, resume.

Precision: the model trains in the dtype it has (a checkpoint loads in its own dtype). On a bfloat16 or float16
base δ is float32 (``deltactl.control.attach.delta_dtype``), and so is the optimiser state. A float16 model also
gets dynamic loss scaling (``torch.amp.GradScaler``): its gradients would otherwise underflow below float16's
6e-8 or overflow above 65504; a step whose gradients overflow is skipped and the scale lowered. Weights that
train in float16 themselves (full fine-tuning of a float16 model) are refused.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from deltactl.control.io import recover_dir, write_atomic
from deltactl.train.checkpoint import generator_states, has_checkpoint, load_checkpoint, save_checkpoint
from deltactl.train.processes import (
    check_engine,
    check_global_batch,
    each_process,
    on_main,
    processes,
    wait_for_everyone,
)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one run."""

    lr: float = 1e-3
    epochs: float = 3.0
    batch_size: int = 32
    warmup: float = 0.06  # share of the steps spent warming up the learning rate
    weight_decay: float = 0.0
    eval_every: int = 100  # steps between evaluations (and checkpoints)
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    max_grad_norm: float = 1.0
    seed: int = 0
    stop_after: int | None = None  # halt after this many steps, leaving a checkpoint to resume from
    mixed_precision: str = "no"  # "bf16": forward passes under bfloat16 autocast (δ and optimiser state float32)

    def __post_init__(self):
        """Refuse values that cannot train, naming the option, the value and what is allowed."""
        def bad(name, allowed):
            value = getattr(self, name)
            return ValueError(f"--{name.replace('_', '-')} {value!r}: must be {allowed}")

        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        if not (number(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0 (e.g. 1e-3)")
        if not (number(self.epochs) and self.epochs > 0):
            raise bad("epochs", "a number > 0 (fractions train part of an epoch, e.g. 0.5)")
        for name in ("batch_size", "eval_every"):
            if not (whole(getattr(self, name)) and getattr(self, name) >= 1):
                raise bad(name, "a whole number ≥ 1")
        if not (whole(self.patience) and self.patience >= 0):
            raise bad("patience", "a whole number ≥ 0 (0: never stop early)")
        if self.stop_after is not None and not (whole(self.stop_after) and self.stop_after >= 1):
            raise bad("stop_after", "a whole number ≥ 1 (or unset)")
        if not (number(self.warmup) and 0 <= self.warmup < 1):
            raise bad("warmup", "a share of the steps in [0, 1)")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            raise bad("weight_decay", "a number ≥ 0")
        if not (number(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise bad("max_grad_norm", "a number ≥ 0 (0: no clipping)")
        if not whole(self.seed):
            raise bad("seed", "a whole number")
        if self.mixed_precision not in ("no", "bf16"):
            raise bad("mixed_precision", "'no' or 'bf16' (float16 autocast is not offered: train a float16 checkpoint "
                      "as it is, with loss scaling, or compute in bf16)")


@dataclass
class Outcome:
    best_metric: float | None
    best_step: int | None
    steps: int
    status: str  # "finished", "early-stopped", "halted", "diverged"
    seconds: float


def fit(
    model: torch.nn.Module,
    trainable: dict[str, torch.nn.Parameter],
    train_set: list,
    collate: Callable[[list], dict],
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    evaluate: Callable[[], dict],
    main_metric: str,
    config: TrainConfig,
    out: Path,
    save_best: Callable[[Path], None],
) -> Outcome:
    """Train ``trainable`` on ``train_set``; every ``eval_every`` steps evaluate, log, keep the best, checkpoint.

    Rerunning with the same ``out`` continues from the last checkpoint and ends with the same δ as an
    uninterrupted run: the data order is a function of (seed, epoch), and the RNG state is checkpointed.

    Under a launcher with N processes, ``config.batch_size`` stays the global batch: each process takes its
    1/N of every batch, so the steps, the schedule and (for a loss that is a mean over examples) the gradient are
    those of one process (but for the last batch of an epoch that does not fill it: accelerate completes it with
    examples from the epoch's start). Only the main process writes to ``out`` and evaluates
    (``deltactl.train.processes``); each process draws its own dropout masks (seed + rank).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = processes()
    check_global_batch(config.batch_size)
    check_engine()
    accelerator = Accelerator(  # precision is config.mixed_precision's (below), whatever the launcher's variables say
        cpu=not torch.cuda.is_available(), mixed_precision="no",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    total = max(1, math.ceil(config.epochs * steps_per_epoch))
    decay = [p for n, p in trainable.items() if p.ndim > 1]
    no_decay = [p for n, p in trainable.items() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warm = max(1, round(config.warmup * total))
    schedule = lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = _loss_scaler(model, trainable)
    model, optimizer = accelerator.prepare(model, optimizer)
    # bf16 autocast is ours rather than accelerate's: its setting is fixed once per process, and a run records it
    computing = lambda: torch.autocast(  # noqa: E731
        accelerator.device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16"
    )
    if config.mixed_precision == "bf16":
        accelerator.print("computing under bfloat16 autocast; δ and the optimiser state stay float32")
    if scaler is not None:
        accelerator.print("float16 model: δ trains in float32 with dynamic loss scaling")

    progress = {"step": 0, "best_metric": None, "best_step": None, "bad_evals": 0, "seconds": 0.0}
    def find_checkpoint():  # a kill mid-save leaves checkpoint.old / checkpoint.tmp, which recover_dir repairs
        recover_dir(out / "checkpoint")
        return has_checkpoint(out / "checkpoint")

    if on_main(find_checkpoint):  # the main process decides; the others read what it found
        progress = load_checkpoint(out / "checkpoint", trainable, optimizer, scheduler, scaler,
                                   rank=state.process_index, device=accelerator.device)
        wait_for_everyone()  # every process has read the checkpoint before the main one rewrites the log
        on_main(lambda: _truncate_log(out / "log.jsonl", progress["step"]))
        accelerator.print(f"resuming from step {progress['step']} of {total} ({out / 'checkpoint'})")
    else:
        torch.manual_seed(config.seed + state.process_index)  # one process: the seed; several: their own masks
        on_main(lambda: write_atomic(out / "log.jsonl", ""))
    started = time.perf_counter() - progress["seconds"]

    def checkpoint():
        progress["seconds"] = time.perf_counter() - started
        generators = each_process(generator_states(accelerator.device))  # each dropout stream resumes where it was
        on_main(lambda: save_checkpoint(out / "checkpoint", trainable, optimizer, scheduler, progress, scaler,
                                        generators))

    status = "finished"
    recent: list[float] = []  # the last losses, for the blow-up check (not checkpointed: refilled after a resume)
    bar = tqdm(
        total=total, initial=progress["step"], desc="train", disable=not accelerator.is_main_process,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
    )
    while progress["step"] < total and status == "finished":
        epoch, done = divmod(progress["step"], steps_per_epoch)
        for batch in _epoch_batches(accelerator, train_set, collate, config, epoch, skip=done):
            model.train()
            with computing():
                loss = loss_fn(model, batch)
            too_small = scaler is not None and scaler.get_scale() < 1
            # the loss of the global batch (each process holds its share's mean): every process sees the same
            # value, so all take the same decision below
            value = accelerator.reduce(loss.detach(), "mean").item() if state.num_processes > 1 else loss.item()
            blown = math.isfinite(value) and len(recent) >= BLOW_UP_WINDOW // 2 and _blown(value, _median(recent))
            if not math.isfinite(value) or too_small or blown:
                status = "diverged"
                kept = (
                    f"the best δ so far (step {progress['best_step']}) is kept in {out / 'best'}"
                    if progress["best_step"] else "no evaluation had run yet, so no δ was kept"
                )
                what = (
                    f"the gradients overflowed float16 even without loss scaling (scale {scaler.get_scale():g})"
                    if too_small else
                    f"the training loss jumped to {value:.4g}, over {BLOW_UP}× and {BLOW_UP_RISE:g} above the median "
                    f"{_median(recent):.4g} of the last {len(recent)} steps" if blown else
                    f"the training loss became {value}"
                )
                advice = (
                    "The model computes in float16, whose range ends at 65504, and its forward or backward pass "
                    "overflowed; loss scaling cannot prevent that. Train the base in bfloat16 or float32 instead "
                    "(save the checkpoint in that dtype, e.g. model.to(torch.bfloat16).save_pretrained(folder)), or "
                    "lower the learning rate (--lr), and rerun with a new --out."
                    if scaler is not None and not blown else
                    "Lower the learning rate (--lr) or the warm-up share and rerun with a new --out."
                )
                accelerator.print(f"stopping: {what} at step {progress['step'] + 1}; {kept}. {advice}")
                break
            accelerator.backward(loss if scaler is None else scaler.scale(loss))
            if scaler is not None:
                scaler.unscale_(optimizer)  # clip the true gradients; an overflow is recorded and the step skipped
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            with warnings.catch_warnings():  # a skipped first step makes the scheduler warn; the schedule counts steps
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`")
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent = (recent + [value])[-BLOW_UP_WINDOW:]
            progress["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            step = progress["step"]
            if step % config.eval_every == 0 or step == total:
                def evaluation(loss=value):
                    with computing():
                        status = _evaluate(model, evaluate, main_metric, config, progress, loss, out, save_best)
                    return status, progress

                status, decided = on_main(evaluation)
                progress.update(decided)
                checkpoint()
            if status == "finished" and config.stop_after and step >= config.stop_after and step < total:
                if step % config.eval_every:
                    checkpoint()
                status = "halted"
            if status != "finished" or step >= total:
                break
        else:  # the epoch's batches ran out: it must have given all of its steps, or the loop would never end
            if progress["step"] < min(total, (epoch + 1) * steps_per_epoch):
                raise RuntimeError(f"epoch {epoch} gave {progress['step'] - epoch * steps_per_epoch} batches, not "
                                   f"{steps_per_epoch}: the data loader and the step count disagree")
    bar.close()
    seconds = time.perf_counter() - started
    outcome = Outcome(progress["best_metric"], progress["best_step"], progress["step"], status, seconds)
    on_main(lambda: write_atomic(out / "outcome.json", json.dumps(asdict(outcome), indent=1) + "\n"))
    return outcome


BLOW_UP, BLOW_UP_WINDOW = 10, 20  # a loss over 10× the median of the last (at least 10 of) 20 steps: diverged
# ... and over 1 nat above it: a fitted run whose loss wanders between 1e-5 and 1e-4 (10×) has not diverged
BLOW_UP_RISE = 1.0


def _blown(value: float, median: float) -> bool:
    """Whether a step's loss ``value`` is a blow-up against the recent ``median``: a jump by a factor and by an
    absolute amount, since a ratio alone takes a memorising run's noise near zero loss for divergence."""
    return value > BLOW_UP * median and value - median > BLOW_UP_RISE


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _loss_scaler(model, trainable) -> torch.amp.GradScaler | None:
    """A GradScaler if the model computes in float16 (None otherwise); refuses weights that train in float16."""
    if not any(p.dtype == torch.float16 for p in model.parameters()):
        return None
    narrow = [n for n, p in trainable.items() if p.dtype == torch.float16]
    if narrow:
        raise ValueError(
            f"{len(narrow):,} trained weights (e.g. {narrow[0]!r}) are float16: an optimiser step on float16 weights "
            "loses small updates and AdamW's ε = 1e-8 rounds to 0 there, so training goes NaN. Train a delta "
            "method instead (its δ is float32 on a float16 base), or train the weights in float32, or at least "
            "bfloat16 (save the checkpoint in that dtype, e.g. model.to(torch.float32).save_pretrained(folder))."
        )
    return torch.amp.GradScaler(next(iter(trainable.values())).device.type)


def _epoch_batches(accelerator, train_set, collate, config, epoch, skip):
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(len(train_set), generator=generator).tolist()
    # The loader's own generator keeps it from drawing on the global RNG (which drives dropout and is
    # checkpointed): starting an epoch then costs the same whether the run was resumed or not.
    loader = DataLoader(Subset(train_set, order), batch_size=config.batch_size, collate_fn=collate, generator=generator)
    loader = accelerator.prepare(loader)
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def _evaluate(model, evaluate, main_metric, config, progress, loss, out, save_best) -> str:
    model.eval()
    with torch.no_grad():
        metrics = evaluate()
    value = metrics[main_metric]
    improved = progress["best_metric"] is None or value > progress["best_metric"]
    if improved:
        progress.update(best_metric=value, best_step=progress["step"], bad_evals=0)
        save_best(out / "best")
    else:
        progress["bad_evals"] += 1
    entry = {"step": progress["step"], "train_loss": loss, **metrics, "best": improved}
    with open(out / "log.jsonl", "a") as log:  # a kill mid-line leaves a partial last line: _truncate_log drops it
        log.write(json.dumps(entry) + "\n")
        log.flush()
        os.fsync(log.fileno())
    if config.patience and progress["bad_evals"] >= config.patience:
        return "early-stopped"
    return "finished"


def read_log(path: Path) -> list[dict]:
    """The entries of a run's log.jsonl; a partial last line (a kill mid-write) is left out, damage elsewhere is an
    error naming the file and line."""
    text = Path(path).read_text()
    lines = text.split("\n")
    entries = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or "step" not in entry:
                raise ValueError("not an evaluation record")
        except ValueError as err:
            if number == len(lines):  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path} line {number} is not a log entry ({err}): the log is damaged; start the run "
                             "afresh in a new --out") from None
        entries.append(entry)
    return entries


def _truncate_log(path: Path, step: int) -> None:
    """Drop evaluations logged after the checkpoint we resume from (they will be redone)."""
    if path.exists():
        kept = [e for e in read_log(path) if e["step"] <= step]
        write_atomic(path, "".join(json.dumps(e) + "\n" for e in kept))
