"""Intrinsic prompt tuning (Qin et al. 2021, "Exploring universal intrinsic task subspace via prompt tuning"), on
the study protocol.

On all-MiniLM-L6-v2 read through the frozen label-word head (nothing but the prompt, or z, trains), for each LM-BFF
16-shot split (the seeds):
  1. prompt tuning (PT, p soft tokens) on every task, seen and unseen, trained to a plateau with its learning rate
     from a grid, both chosen on the split's 16-shot dev file (the selection split): the baseline, and (seen
     tasks) the prompts the subspace is found from;
  2. the autoencoder ``PromptAutoencoder`` (Proj: ℝ^{p·h} → ℝ^{d_I}; Back: ℝ^{d_I} → hidden → ℝ^{p·h} through
     tanh) trained on the seen tasks with L = mean_t ℓ_t(Back(Proj(P_t))) + α ‖P̂_t − P_t‖² / ‖P_t‖², its learning
     rate and stopping step chosen on the mean selection accuracy of the reconstructed seen prompts;
  3. ``IntrinsicPrompt``: only z ∈ ℝ^{d_I} (from 0) trains on each task, seen and unseen, Back frozen, to a plateau
     with its learning rate from a grid, chosen on the selection split;
  4. the control: the same z-tuning through a random back-projection of the same shapes, each tensor a Gaussian
     direction with the learned tensor's Frobenius norm (seeded by the split).
Every number is accuracy on the task's test set (the report split, never seen by a choice); the claims are read
by the rules stated in README.md before the full run.

    python experiments/ipt/run.py --quick
    python experiments/ipt/run.py                    # the full study (resumable: every stage is cached)
    python experiments/ipt/run.py --seeds 13,21,42   # only these seeds
    python experiments/ipt/run.py --plot-only        # redraw figure.png from results.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call  # noqa: E402

from deltactl.experiments import kshot  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.study import main, plot_verdicts, save_figure, threads, work_dir  # noqa: E402
from deltactl.subspace import IntrinsicPrompt, PromptAutoencoder  # noqa: E402
from deltactl.train.loop import fit, read_log  # noqa: E402

PAPER = ("Qin et al. 2021 (BART-base, 100-token prompts, 120 few-shot tasks): z-tuning of 5 free parameters in a "
         "subspace found from 100 seen tasks' prompts recovers 87% of prompt tuning's performance on the seen tasks "
         "and 65% on 20 unseen tasks")
PROMPT = "prompt"
FT = "ft"
# the rows of the table: what each quantity is
ROWS = {
    "zero_shot": "zero-shot (no prompt)",
    "pt": "prompt tuning",
    "ipt": "IPT (z in the learned subspace)",
    "random": "z in a random subspace",
    "offset": "learned subspace at z = 0",
}


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the setting's seeds to train, evaluate and report")


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fresh_folder(folder: Path, key: dict) -> dict | None:
    """The cached record of ``folder`` if it holds this key; else the folder is cleared (another setting's run is
    never resumed into this one), made, and None returned."""
    stored = folder / "result.json"
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return json.loads(stored.read_text())
    if folder.exists() and (not (folder / "key.json").exists() or json.loads((folder / "key.json").read_text()) != key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(key) + "\n")
    return None


# ----------------------------------------------------------------------------------------------------- models

class Models:
    """One task model per task with a prompt attached (the rows are swapped in functionally, never written), and
    one without (zero-shot); built once and reused by every stage and evaluation."""

    def __init__(self, cfg: dict, data):
        self.cfg, self.data, self.built = cfg, data, {}

    def get(self, task: str, method: str = PROMPT):
        if (task, method) not in self.built:
            options = {"length": self.cfg["prompt_length"]} if method == PROMPT else None
            spec = kshot.spec(method, task, self.cfg["seeds"][0], 1e-3, self.cfg["train"], options)
            _, task_model, _ = kshot.run.build(spec, self.data)
            for p in task_model.model.parameters():
                p.requires_grad_(False)
            task_model.model.eval()
            self.built[(task, method)] = task_model
        return self.built[(task, method)]

    def rows_name(self, task: str) -> str:
        names = [n for n, _ in self.get(task).model.named_parameters() if ".prompt." in n and n.endswith("rows")]
        if len(names) != 1:
            raise RuntimeError(f"expected one prompt-rows tensor, found {names}")
        return names[0]


class WithRows(nn.Module):
    """A task model whose prompt rows are ``rows()`` (applied with functional_call; the model is not written)."""

    def __init__(self, model: nn.Module, name: str, rows):
        super().__init__()
        self._model, self.name, self.rows = (model,), name, rows

    def forward(self, **batch):
        return functional_call(self._model[0], {self.name: self.rows()}, (), batch, strict=False)

    def parameters(self, recurse: bool = True):
        return self._model[0].parameters(recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self._model[0].train(mode)
        return self


def accuracy(models: Models, task: str, rows: torch.Tensor | None, examples: list) -> float:
    """Accuracy on ``examples`` with the prompt rows ``rows`` (None: the model without a prompt)."""
    if rows is None:
        task_model = models.get(task, FT)
        model = task_model.model
    else:
        task_model = models.get(task)
        fixed = rows.detach()
        model = WithRows(task_model.model, models.rows_name(task), lambda: fixed)
    model.eval()
    with torch.no_grad():
        return task_model.evaluate(model, examples, 64)["accuracy"]


class Reports:
    """Report-split accuracies, cached in one JSON file per report split (keyed by what produced the rows)."""

    def __init__(self, models: Models, report: dict, work: Path):
        self.models, self.report = models, report
        self.path = work / f"report-{digest({t: pr.split_keys(e) for t, e in report.items()})}.json"
        self.values = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, name: str, task: str, rows) -> float:
        if name not in self.values:
            value = accuracy(self.models, task, rows() if callable(rows) else rows, self.report[task])
            self.values[name] = value
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kshot.write_json(self.path, self.values)
        return self.values[name]


# --------------------------------------------------------------------------------------------------- stages

def prompt_tuning(cfg, task, seed, fitting, work, data) -> tuple[dict, torch.Tensor]:
    """Stage 1: prompt tuning on (task, seed) for every lr of the grid, the lr chosen on the selection split; the
    chosen run's record and its best prompt rows."""
    options = {"length": cfg["prompt_length"]}
    folders = {lr: work / "pt" / f"{task}-seed{seed}-lr{lr:g}" for lr in cfg["pt_lr_grid"]}
    records = {lr: kshot.train_to_plateau(PROMPT, options, task, seed, lr, cfg["train"], fitting, folders[lr], data)
               for lr in cfg["pt_lr_grid"]}
    best, scores = pr.select(cfg["pt_lr_grid"], lambda lr: records[lr]["selection_accuracy"])
    (rows,) = kshot.best_delta(folders[best]).values()
    chosen = records[best]
    return {"stage": "pt", "task": task, "seed": seed, "lr": best, "key": digest(chosen["key"]),
            "selection_scores": {f"{k:g}": v for k, v in scores.items()},
            "selection_accuracy": chosen["selection_accuracy"], "best_step": chosen["best_step"],
            "steps": chosen["steps"], "status": chosen["status"],
            "trainable_parameters": chosen["trainable_parameters"],
            "seconds": round(sum(r["seconds"] for r in records.values()), 1)}, rows


def task_loss(model, batch) -> torch.Tensor:
    batch = dict(batch)
    labels = batch.pop("labels")
    return F.cross_entropy(model(**batch).float(), labels)


def batches(examples: list, collate, size: int, seed: int):
    """An endless stream of shuffled batches, reshuffled every pass (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), size):
            yield collate([examples[i] for i in order[start: start + size]])


def train_autoencoder(cfg, seed, lr, prompts: dict, pt_keys: dict, models: Models, fitting, folder: Path) -> dict:
    """Stage 2 at one lr: the autoencoder on the seen tasks' prompts, evaluated every ``eval_every`` steps on the
    mean selection accuracy of the reconstructed seen prompts, stopped after ``patience`` evaluations without a
    gain (at most ``max_steps``); the best one is kept in ``folder/autoencoder.safetensors``."""
    a = cfg["autoencoder"]
    key = {"stage": "autoencoder", "seed": seed, "lr": lr, "seen": cfg["seen"], "prompts": pt_keys,
           "intrinsic_dim": cfg["intrinsic_dim"], "hidden": cfg["hidden"], "alpha": cfg["alpha"], "train": a}
    record = fresh_folder(folder, key)
    if record is not None:
        return record
    started = time.perf_counter()
    torch.manual_seed(seed)
    length, width = next(iter(prompts.values())).shape
    ae = PromptAutoencoder(length, width, cfg["intrinsic_dim"], cfg["hidden"])
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    wrapped = {t: WithRows(models.get(t).model, models.rows_name(t), None) for t in cfg["seen"]}
    streams = {t: batches(fitting[(t, seed)]["train"], models.get(t).collate, a["batch_size"], seed + i)
               for i, t in enumerate(cfg["seen"])}

    def selection() -> float:
        ae.eval()
        with torch.no_grad():
            return sum(accuracy(models, t, ae(prompts[t]), fitting[(t, seed)]["dev"]) for t in cfg["seen"]) / len(
                cfg["seen"])

    best, best_step, bad, curve, step = -1.0, 0, 0, [], 0
    while step < a["max_steps"] and bad < a["patience"]:
        ae.train()
        total = 0.0
        for t in cfg["seen"]:
            recon = ae(prompts[t])
            wrapped[t].rows = lambda recon=recon: recon
            wrapped[t].train()
            total = total + task_loss(wrapped[t], next(streams[t]))
            total = total + cfg["alpha"] * (recon - prompts[t]).pow(2).sum() / prompts[t].pow(2).sum()
        loss = total / len(cfg["seen"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % a["eval_every"] == 0:
            score = selection()
            curve.append({"step": step, "accuracy": score, "loss": loss.item()})
            if score > best:
                best, best_step, bad = score, step, 0
                save_file({k: v.detach().contiguous() for k, v in ae.state_dict().items()},
                          str(folder / "autoencoder.safetensors"))
            else:
                bad += 1
    for m in wrapped.values():
        m.eval()
    record = {"key": key, "stage": "autoencoder", "seed": seed, "lr": lr, "selection_accuracy": best,
              "best_step": best_step, "steps": step, "status": "early-stopped" if bad >= a["patience"] else "finished",
              "curve": curve, "seconds": round(time.perf_counter() - started, 1)}
    kshot.write_json(folder / "result.json", record)
    return record


def load_autoencoder(cfg, folder: Path, length: int, width: int) -> PromptAutoencoder:
    ae = PromptAutoencoder(length, width, cfg["intrinsic_dim"], cfg["hidden"])
    ae.load_state_dict(load_file(str(folder / "autoencoder.safetensors")))
    return ae.eval().requires_grad_(False)


def random_like(ae: PromptAutoencoder, seed: int) -> PromptAutoencoder:
    """The control: an autoencoder of the same shapes whose every tensor is a Gaussian direction with the learned
    tensor's Frobenius norm (seeded by the split)."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    out = PromptAutoencoder(ae.length, ae.width, ae.down.out_features, ae.up[0].out_features)
    state = {}
    for name, value in sorted(ae.state_dict().items()):
        direction = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        state[name] = (direction * (value.double().norm() / direction.norm())).to(value.dtype)
    out.load_state_dict(state)
    return out.eval().requires_grad_(False)


def tune_z(cfg, kind: str, back: PromptAutoencoder, back_key: str, task: str, seed: int, lr: float,
           models: Models, fitting, folder: Path) -> dict:
    """Stage 3 at one lr: only z ∈ ℝ^{d_I} (from 0) trains on (task, seed) through the frozen ``back``, to a plateau
    on the selection split (the trainer's early stopping); the best z in ``folder/best``."""
    key = {"stage": kind, "task": task, "seed": seed, "lr": lr, "back": back_key, "train": cfg["train"]}
    record = fresh_folder(folder, key)
    if record is not None:
        return record
    started = time.perf_counter()
    task_model = models.get(task)
    torch.manual_seed(seed)
    ipt = IntrinsicPrompt(task_model.model, models.rows_name(task), back)
    spec = kshot.spec(PROMPT, task, seed, lr, cfg["train"], {"length": cfg["prompt_length"]},
                      epochs=float(cfg["train"]["max_epochs"]))
    dev = fitting[(task, seed)]["dev"]

    def save_best(best: Path):
        best.mkdir(parents=True, exist_ok=True)
        save_file({"z": ipt.z.detach().contiguous()}, str(best / kshot.BEST))

    try:
        outcome = fit(ipt, ipt.trainable(), fitting[(task, seed)]["train"], task_model.collate, task_model.loss,
                      lambda: task_model.evaluate(ipt, dev, 64), "accuracy", spec.train, folder, save_best)
    finally:
        ipt.detach()
        task_model.model.eval()
        for p in task_model.model.parameters():
            p.requires_grad_(False)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    curve = [{"step": e["step"], "accuracy": e["accuracy"]} for e in read_log(folder / "log.jsonl") if "accuracy" in e]
    record = {"key": key, "stage": kind, "task": task, "seed": seed, "lr": lr,
              "selection_accuracy": outcome.best_metric, "best_step": outcome.best_step, "steps": outcome.steps,
              "status": outcome.status, "curve": curve, "seconds": round(time.perf_counter() - started, 1)}
    kshot.write_json(folder / "result.json", record)
    return record


def chosen_z(cfg, kind, back, back_key, task, seed, models, fitting, work) -> tuple[dict, torch.Tensor]:
    folders = {lr: work / kind / f"{task}-seed{seed}-lr{lr:g}" for lr in cfg["z_lr_grid"]}
    records = {lr: tune_z(cfg, kind, back, back_key, task, seed, lr, models, fitting, folders[lr])
               for lr in cfg["z_lr_grid"]}
    best, scores = pr.select(cfg["z_lr_grid"], lambda lr: records[lr]["selection_accuracy"])
    z = load_file(str(folders[best] / "best" / kshot.BEST))["z"]
    chosen = records[best]
    return {"stage": kind, "task": task, "seed": seed, "lr": best, "key": digest(chosen["key"]),
            "selection_scores": {f"{k:g}": v for k, v in scores.items()},
            "selection_accuracy": chosen["selection_accuracy"], "best_step": chosen["best_step"],
            "steps": chosen["steps"], "status": chosen["status"], "trainable_parameters": z.numel(),
            "seconds": round(sum(r["seconds"] for r in records.values()), 1)}, z


# --------------------------------------------------------------------------------------------------- measure

def measure(cfg: dict, args) -> dict:
    threads()
    tasks = cfg["seen"] + cfg["unseen"]
    # the report split drops what any seed of the setting trains or chooses on: the same whichever seeds run
    fitting, report, dropped = kshot.splits(tasks, cfg["seeds"], args.data, cfg.get("report_examples"))
    cfg = kshot.only_seeds(cfg, getattr(args, "seeds", None))
    work = work_dir("ipt", args)
    models = Models(cfg, args.data)
    reports = Reports(models, report, work)
    zero = {t: reports(f"zero_shot|{t}", t, None) for t in tasks}
    cells, runs = [], []

    def cell(row, task, seed, value):
        cells.append({"row": row, "task": task, "seed": seed, "value": value})

    for seed in cfg["seeds"]:  # seed outermost: an interrupted study already holds every stage at the first seeds
        started = time.perf_counter()
        prompts, pt_keys = {}, {}
        for task in tasks:
            record, rows = prompt_tuning(cfg, task, seed, fitting, work, args.data)
            prompts[task], pt_keys[task] = rows, record["key"]
            record["report_accuracy"] = reports(f"pt|{task}|{seed}|{record['key']}", task, rows)
            runs.append(record)
            cell("zero_shot", task, seed, zero[task])
            cell("pt", task, seed, record["report_accuracy"])
        seen = {t: prompts[t] for t in cfg["seen"]}
        ae_runs = {lr: train_autoencoder(cfg, seed, lr, seen, {t: pt_keys[t] for t in cfg["seen"]}, models, fitting,
                                         work / "autoencoder" / f"seed{seed}-lr{lr:g}")
                   for lr in cfg["ae_lr_grid"]}
        best, scores = pr.select(cfg["ae_lr_grid"], lambda lr, done=ae_runs: done[lr]["selection_accuracy"])
        length, width = prompts[tasks[0]].shape
        ae = load_autoencoder(cfg, work / "autoencoder" / f"seed{seed}-lr{best:g}", length, width)
        ae_key = digest(ae_runs[best]["key"])
        runs.append({"stage": "autoencoder", "seed": seed, "lr": best, "key": ae_key,
                     "selection_scores": {f"{k:g}": v for k, v in scores.items()},
                     **{k: ae_runs[best][k] for k in ("selection_accuracy", "best_step", "steps", "status", "curve")},
                     "seconds": round(sum(r["seconds"] for r in ae_runs.values()), 1)})
        control = random_like(ae, seed)
        control_key = digest({"random_like": ae_key, "seed": seed})
        for task in tasks:
            offset = ae.decode(torch.zeros(cfg["intrinsic_dim"]))
            cell("offset", task, seed, reports(f"offset|{task}|{seed}|{ae_key}", task, offset))
            for kind, back, back_key in (("ipt", ae, ae_key), ("random", control, control_key)):
                record, z = chosen_z(cfg, kind, back, back_key, task, seed, models, fitting, work)
                record["report_accuracy"] = reports(f"{kind}|{task}|{seed}|{record['key']}", task,
                                                    lambda b=back, z=z: b.decode(z))
                runs.append(record)
                cell(kind, task, seed, record["report_accuracy"])
        print(f"seed {seed}: " + "; ".join(
            f"{t} zs {zero[t]:.3f} pt {_cell(cells, 'pt', t, seed):.3f} ipt {_cell(cells, 'ipt', t, seed):.3f} "
            f"random {_cell(cells, 'random', t, seed):.3f}" for t in tasks)
            + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    return {"seeds": cfg["seeds"], "paper": PAPER, "head": kshot.HEAD, "model": "all-MiniLM-L6-v2",
            "seen": cfg["seen"], "unseen": cfg["unseen"], "zero_shot": zero,
            "protocol": {**kshot.protocol_record(fitting, report, dropped, cfg["seeds"]), "selection_split":
                         "each split's 16-shot dev file (the autoencoder's: the seen tasks' dev files)"},
            "cells": cells, "runs": runs, "table": table(cells, cfg), "recovered": recovered(cells, cfg),
            "verdicts": verdicts(cells, cfg), "train_seconds": round(sum(r["seconds"] for r in runs), 1)}


def _cell(cells, row, task, seed) -> float:
    return next(c["value"] for c in cells if (c["row"], c["task"], c["seed"]) == (row, task, seed))


# -------------------------------------------------------------------------------------------- table, verdicts

def per_seed(cells: list[dict], row: str, tasks: list[str]) -> list[float]:
    """Per seed (in order): the mean of ``row`` over ``tasks``."""
    out = []
    for seed in sorted({c["seed"] for c in cells}):
        values = [c["value"] for c in cells if c["row"] == row and c["seed"] == seed and c["task"] in tasks]
        out.append(sum(values) / len(values))
    return out


def groups(cfg: dict) -> dict:
    return {"seen": cfg["seen"], "unseen": cfg["unseen"]}


def table(cells: list[dict], cfg: dict) -> list[dict]:
    """One row per (row, task or a group's mean): report accuracy, mean and interval over seeds."""
    rows = []
    for row in ROWS:
        for group, members in groups(cfg).items():
            for task in [*members, f"{group} mean"]:
                values = per_seed(cells, row, members if task == f"{group} mean" else [task])
                rows.append({"row": row, "method": ROWS[row], "task": task, "group": group,
                             "quantity": "report_accuracy", "summary": pr.summary(values).to_dict()})
    return rows


def recovered(cells: list[dict], cfg: dict) -> list[dict]:
    """The paper's figure, per group: the raw ratio mean IPT / mean PT and the recovered gain (IPT − zero-shot) /
    (PT − zero-shot), per seed over the group's tasks; no rule reads either (a ratio is unstable when PT gains
    little over zero-shot, and a raw ratio near 1 is also what a prompt that learned nothing gives)."""
    out = []
    for group, members in groups(cfg).items():
        ipt, pt, zs = (per_seed(cells, row, members) for row in ("ipt", "pt", "zero_shot"))
        for name, values in (("ipt_over_pt", [a / b for a, b in zip(ipt, pt)]),
                             ("gain_recovered", [(a - z) / (b - z) if abs(b - z) > 1e-9 else None
                                                 for a, b, z in zip(ipt, pt, zs)])):
            finite = [v for v in values if v is not None]
            out.append({"group": group, "quantity": name, "values": values,
                        "summary": pr.summary(finite).to_dict() if finite else None})
    return out


# The claims and rules of README.md, stated before the full run: (id, claim, group, a, b, rule)
MARGIN = 0.03
CLAIMS = (
    ("S0", "(precondition) prompt tuning beats zero-shot on the seen tasks", "seen", "pt", "zero_shot",
     pr.BetterRule()),
    ("S1", "IPT matches prompt tuning on the seen tasks", "seen", "ipt", "pt", pr.MatchRule(MARGIN)),
    ("S2", "IPT beats zero-shot on the seen tasks", "seen", "ipt", "zero_shot", pr.BetterRule()),
    ("S3", "the learned subspace beats a random one of the same dimension on the seen tasks", "seen", "ipt",
     "random", pr.BetterRule()),
    ("U0", "(precondition) prompt tuning beats zero-shot on the unseen tasks", "unseen", "pt", "zero_shot",
     pr.BetterRule()),
    ("U1", "IPT beats zero-shot on the unseen tasks", "unseen", "ipt", "zero_shot", pr.BetterRule()),
    ("U2", "the learned subspace beats a random one of the same dimension on the unseen tasks", "unseen", "ipt",
     "random", pr.BetterRule()),
    ("Z1", "tuning z adds to the learned subspace's starting point (IPT beats z = 0), all tasks", "all", "ipt",
     "offset", pr.BetterRule()),
)


def verdicts(cells: list[dict], cfg: dict) -> list[dict]:
    out = []
    members = {**groups(cfg), "all": cfg["seen"] + cfg["unseen"]}
    for claim_id, claim, group, a, b, rule in CLAIMS:
        difference = pr.paired_summary(per_seed(cells, a, members[group]), per_seed(cells, b, members[group]))
        out.append({"id": claim_id, "claim": claim, "group": group, "a": a, "b": b, "rule": pr.rule_record(rule),
                    "difference": difference.to_dict(), "verdict": rule.verdict(difference)})
    return out


# ------------------------------------------------------------------------------------------------------ plot

def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = payload["table"]
    shown = ["zero_shot", "pt", "ipt", "random", "offset"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(16, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    ax = axes[0]
    width = 0.8 / len(shown)
    for k, row in enumerate(shown):
        cells = [next((r["summary"] for r in rows if (r["row"], r["task"]) == (row, t)), None) for t in tasks]
        xs = [i + (k - (len(shown) - 1) / 2) * width for i, c in enumerate(cells) if c]
        cells = [c for c in cells if c]
        ax.bar(xs, [c["mean"] for c in cells], width, label=ROWS[row], color=f"C{k}",
               yerr=[[c["mean"] - c["low"] for c in cells], [c["high"] - c["mean"] for c in cells]], capsize=2)
    unseen = set(payload.get("unseen", []))
    ax.set_xticks(range(len(tasks)), [t + ("*" if t in unseen else "") for t in tasks], fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("report accuracy (test set)", fontsize=8)
    ax.set_title("accuracy: mean [95% CI] over seeds (* unseen)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3, axis="y")
    found = payload["verdicts"]
    plot_verdicts(axes[1], found, "difference a − b in accuracy (mean over the group's tasks; 95% bootstrap CI over "
                  "seeds)", [f"{v['id']} {v['a']} − {v['b']} ({v['group']}): {v['verdict']}" for v in found])
    axes[1].set_title("claims (rules in experiments/ipt/README.md)", fontsize=9)
    cfg = payload["config"]
    save_figure(fig, path, f"intrinsic prompt tuning, all-MiniLM-L6-v2 ({payload.get('head')} head), "
                           f"{cfg['prompt_length']}-token prompts, d_I = {cfg['intrinsic_dim']}, 16-shot splits as "
                           f"seeds {payload['seeds']}, {payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
