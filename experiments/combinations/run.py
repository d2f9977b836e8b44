"""Combinations of delta-tuning methods (Ding et al. 2023, §"Combinations of delta-tuning methods", Table 5).

Three deltas act at different sites of the frozen MiniLM: prompt tuning (P, soft tokens prepended to the input
embeddings), BitFit (B, the biases) and adapters (A, bottleneck MLPs after the sublayers). Two ways of using
several of them:

* simultaneous — every subset S ⊆ {P, B, A} is attached at once and trained together: min over (δ_s)_{s∈S} and
  the head of L(G_S(θ, δ)); the empty subset is the frozen backbone with only the classifier head trained
  ("head only": a BitFit delta attached and disabled, so the backbone is frozen and nothing of it moves);
* sequential — P, then B on top of the trained and frozen P, then A on top of the frozen P and B: stage k
  minimises L over δ_k and the head, with δ_1 … δ_{k−1} fixed at the previous stages' best values
  (``RunSpec.after``); every stage has the same step budget as one simultaneous run.

Each run is selected on a small dev subset (best evaluation) and reported on a disjoint held-out subset:
SST-2 "full data" (a seeded training subsample; selection and report both from the GLUE dev set, disjoint) and
16-shot (LM-BFF split ``kshot_seed``: selection on its 32-example dev set, report on its test set = GLUE dev).

The paper's third axis, with and without a manual template, needs a model that reads a template and fills its
blank with a label word. A setting with ``"t5": SIZE`` runs on a T5 pre-trained here with span corruption (the
checkpoint the scale study uses, ``pretrain`` settings in config.json), text-to-text with rank classification,
and ``"template": true`` gives it LM-BFF's manual template with the blank as its first sentinel
(``deltactl.tasks.templates``: "<S1> It was <extra_id_0> ." → "<extra_id_0> great"), against the T5 task prefix
("sst2 sentence: <S1>" → "positive") without. A T5 has no head, so its empty subset trains nothing: it is the
zero-shot model, through the template or not.

    python experiments/combinations/run.py --quick
    python experiments/combinations/run.py --setting reduced
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from itertools import combinations
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import deltactl as dc  # noqa: E402
from deltactl.experiments.finetune import SUBSET_SEED, Budget, epochs_for, subset, weights_digest  # noqa: E402
from deltactl.experiments.study import main, save_figure, threads, work_dir  # noqa: E402
from deltactl.train import run  # noqa: E402
from deltactl.train.loop import fit  # noqa: E402

PARTS = ("prompt", "bitfit", "adapter")  # the paper's order, also the order of the sequential stages
LETTER = {"prompt": "P", "bitfit": "B", "adapter": "A"}
HEAD_ONLY = "none"
PAPER = (
    "Ding et al. 2023, Table 5 (RoBERTa-large, GLUE/SuperGLUE): simultaneous - combining methods is generally "
    "better than any single one (adapter+BitFit, or all three, are the strongest); prompt tuning added to the "
    "others hurts in the full-data setting and helps only in the few-shot setting with a manual template. "
    "Sequential (P -> B -> A, earlier stages frozen) - adding a stage can improve on the previous one but does "
    "not always; there is no order that always helps."
)


def label(method: str) -> str:
    """``prompt+adapter`` → ``P+A``; the empty subset is ``head only``."""
    return "head only" if method == HEAD_ONLY else "+".join(LETTER[m] for m in method.split("+"))


def simultaneous_methods() -> list[str]:
    """Every subset of {P, B, A}, the empty one first (as ``none``), in the paper's order within a subset."""
    subsets = [c for k in range(len(PARTS) + 1) for c in combinations(PARTS, k)]
    return ["+".join(c) if c else HEAD_ONLY for c in subsets]


def _split_sets(task, setting: dict) -> tuple[list, list]:
    """(selection set, report set): disjoint; see the module docstring."""
    if setting.get("kshot_seed") is not None:
        return list(task.dev), subset(task.splits["test"], setting["report_examples"])
    picked = subset(task.dev, setting["select_examples"] + setting["report_examples"])
    return picked[: setting["select_examples"]], picked[setting["select_examples"]:]


def train_stage(method: str, setting: dict, seed: int, budget: Budget, out: Path, data=None,
                after: Path | None = None, lr: float | None = None, model: str | None = None) -> dict:
    """Train one run (a subset trained simultaneously, or one sequential stage ``after`` an earlier one).

    Like :func:`deltactl.experiments.finetune.run_budgeted` (fixed seeded subsets, exactly ``budget.steps``
    steps, a finished run with the same settings is reused), but keeps ``run.json`` and ``best/`` so that a
    later stage can restore this one, and scores the best δ on the report set. ``model``: a T5 checkpoint
    folder (None: MiniLM). Returns the record.
    """
    out = Path(out)
    earlier = json.loads((after / "result.json").read_text())["key"] if after else None
    key = {"method": method, "task": setting["task"], "kshot_seed": setting.get("kshot_seed"), "seed": seed,
           "budget": asdict(budget), "lr": lr, "after": earlier,
           "sets": [setting.get(k) for k in ("select_examples", "report_examples")]}
    if model:  # recorded only when set, so the records of MiniLM runs stay valid
        key.update(model=model, weights=weights_digest(model), template=bool(setting.get("template")))
    stored = out / "result.json"
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return json.loads(stored.read_text())
    shutil.rmtree(out, ignore_errors=True)  # a partial or different run: start it afresh (runs are short)
    out.mkdir(parents=True)
    started = time.perf_counter()
    spec = run.resolve(
        "bitfit" if method == HEAD_ONLY else method, setting["task"],
        {"batch_size": budget.batch_size, "eval_every": budget.eval_every, "seed": seed, "epochs": 1.0,
         **({"lr": lr} if lr else {})},
        kshot_seed=setting.get("kshot_seed"), max_length=budget.max_length, after=str(after) if after else None,
        model=model, template=bool(setting.get("template")),
    )
    task, task_model, deltas = run.build_deltas(spec, data)
    if method == HEAD_ONLY:
        for delta in deltas:
            delta.disable()  # the backbone stays frozen (attached), the delta neither acts nor trains
        deltas = []
        if not task_model.head:  # a T5: nothing trains, the empty subset is the zero-shot model
            return _zero_shot(task, task_model, setting, budget, key, out, started)
    train_set = subset(task.train, budget.train_examples)
    select, report = _split_sets(task, setting)
    spec = replace(spec, train=replace(spec.train, epochs=epochs_for(budget.steps, len(train_set), budget.batch_size)))
    (out / "run.json").write_text(json.dumps(spec.to_dict(), indent=1) + "\n")  # what a later stage restores
    trainable = run.trainable_parameters(task_model)
    eval_batch = max(budget.batch_size, 64)

    def save_best(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.items()},
                  str(folder / "trainable.safetensors"))

    def loss(model, batch):  # the task loss plus the deltas' regularisers R(δ), as deltactl.train.run.train
        value = task_model.loss(model, batch)
        penalty = dc.penalty(deltas[0].model) if deltas else None
        return value if penalty is None else value + penalty

    outcome = fit(
        task_model.model, trainable, train_set, task_model.collate, loss,
        lambda: task_model.evaluate(task_model.model, select, eval_batch), task.main_metric, spec.train, out,
        save_best,
    )
    if not (out / "best" / "trainable.safetensors").exists():
        raise RuntimeError(f"{out}: the run kept no δ (status {outcome.status}); see {out / 'log.jsonl'}")
    with torch.no_grad():
        for name, value in load_file(str(out / "best" / "trainable.safetensors")).items():
            trainable[name].copy_(value)
    task_model.model.eval()
    with torch.no_grad():
        scores = {"select": task_model.evaluate(task_model.model, select, eval_batch)[task.main_metric],
                  "report": task_model.evaluate(task_model.model, report, eval_batch)[task.main_metric]}
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # best/ stays: a later stage restores it
    record = {
        "key": key, "method": method, "label": label(method), "main_metric": task.main_metric,
        "lr": spec.train.lr, "train_examples": len(train_set), "select_examples": len(select),
        "report_examples": len(report), "trainable_parameters": sum(p.numel() for p in trainable.values()),
        "outcome": asdict(outcome), **scores,
        "log": [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line],
        "seconds": round(time.perf_counter() - started, 1),
    }
    stored.write_text(json.dumps(record, indent=1) + "\n")
    return record


def _zero_shot(task, task_model, setting, budget, key, out, started) -> dict:
    """The record of a run that trains nothing: the frozen model scored on the selection and report sets."""
    select, report = _split_sets(task, setting)
    task_model.model.eval()
    with torch.no_grad():
        scores = {name: task_model.evaluate(task_model.model, examples, max(budget.batch_size, 64))[task.main_metric]
                  for name, examples in (("select", select), ("report", report))}
    record = {"key": key, "method": HEAD_ONLY, "label": "zero-shot", "main_metric": task.main_metric, "lr": 0.0,
              "train_examples": 0, "select_examples": len(select), "report_examples": len(report),
              "trainable_parameters": 0, "outcome": {"best_step": 0, "steps": 0, "status": "nothing to train"},
              **scores, "log": [], "seconds": round(time.perf_counter() - started, 1)}
    (out / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def checkpoint(setting: dict, cfg: dict, args) -> str | None:
    """The T5 checkpoint folder a setting names (``"t5": SIZE``), pre-trained now if absent; None for MiniLM."""
    if "t5" not in setting:
        return None
    from deltactl.experiments.study import mode
    from deltactl.train.pretrain import PretrainConfig, pretrained

    fields = {**cfg["pretrain"], "size": setting["t5"]}
    if "tasks" in fields:
        fields["tasks"] = tuple(fields["tasks"])
    quick = work_dir("combinations", args) / f"t5-{setting['t5']}" if mode(args) == "quick" else None
    return str(pretrained(PretrainConfig(**fields), quick, data=args.data)[0])


def measure(cfg: dict, args) -> dict:
    threads()
    torch.manual_seed(SUBSET_SEED)
    root = work_dir("combinations", args)
    unknown = set(args.only or []) - set(cfg["settings"])
    if unknown:
        raise ValueError(f"--only {', '.join(sorted(unknown))}: not a setting here; settings: "
                         f"{', '.join(cfg['settings'])}")
    settings = {}
    for name, setting in cfg["settings"].items():
        if args.only and name not in args.only:
            continue
        budget = Budget(**{**cfg["budget"], **setting.get("budget", {})})  # a setting may shorten its runs
        folder = root / name
        model = checkpoint(setting, cfg, args)
        simultaneous, sequential = [], []
        for seed in cfg["seeds"]:
            for method in simultaneous_methods():
                lr = cfg["head_lr"] if method == HEAD_ONLY else None
                record = train_stage(method, setting, seed, budget, folder / f"{method}-seed{seed}", args.data, lr=lr,
                                     model=model)
                simultaneous.append(_row(record, seed))
                print(f"{name} simultaneous {record['label']:9s} seed {seed}: report {record['report']:.4f} "
                      f"(select {record['select']:.4f}, {record['seconds']} s)", flush=True)
            # stage 1 of the sequential chain is the simultaneous {P} run itself
            after = folder / f"{PARTS[0]}-seed{seed}"
            chain = [PARTS[0]]
            sequential.append({**_row(json.loads((after / "result.json").read_text()), seed), "stage": "P"})
            for part in PARTS[1:]:
                chain.append(part)
                stage = "→".join(LETTER[m] for m in chain)
                out = folder / f"seq-{'-'.join(chain)}-seed{seed}"
                record = train_stage(part, setting, seed, budget, out, args.data, after=after, model=model)
                sequential.append({**_row(record, seed), "stage": stage})
                print(f"{name} sequential {stage:9s} seed {seed}: report {record['report']:.4f} "
                      f"(select {record['select']:.4f}, {record['seconds']} s)", flush=True)
                after = out
        settings[name] = {"setting": setting, "budget": asdict(budget), "simultaneous": simultaneous,
                          "sequential": sequential}
    rows = [r for s in settings.values() for r in s["simultaneous"] + s["sequential"][1:]]
    return {"seeds": cfg["seeds"], "work_dir": root, "paper": PAPER, "settings": settings,
            "compute_seconds": round(sum(r["seconds"] for r in rows), 1)}


def _row(record: dict, seed: int) -> dict:
    keep = ("method", "label", "main_metric", "lr", "trainable_parameters", "select", "report", "seconds",
            "train_examples", "select_examples", "report_examples")
    return {"seed": seed, **{k: record[k] for k in keep}, "best_step": record["outcome"]["best_step"],
            "steps": record["outcome"]["steps"], "status": record["outcome"]["status"]}


def mean_by(rows: list[dict], field: str) -> dict[str, float]:
    """Mean report metric per ``field`` value (over seeds), in first-seen order."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r[field], []).append(r["report"])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    settings = payload["settings"]
    columns = min(2, len(settings))
    rows = -(-len(settings) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.0 * rows), squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.axis("off")
    for ax, block in zip(axes.flat, settings.values()):
        sim = mean_by(block["simultaneous"], "label")
        seq = mean_by(block["sequential"], "stage")
        names = [*sim, *seq]
        colours = ["tab:blue"] * len(sim) + ["tab:orange"] * len(seq)
        ax.bar(range(len(names)), [*sim.values(), *seq.values()], color=colours)
        for i, value in enumerate([*sim.values(), *seq.values()]):
            ax.text(i, value + 0.01, f"{value:.3f}", ha="center", fontsize=6)
        ax.axvline(len(sim) - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_xticks(range(len(names)), names, rotation=40, fontsize=7)
        metric = block["simultaneous"][0]["main_metric"]
        ax.set_ylabel(f"{metric} (report set)", fontsize=8)
        ax.set_ylim(0, 1.08)
        setting = block["setting"]
        where = f"16-shot, seed {setting['kshot_seed']}" if setting.get("kshot_seed") is not None else "subsample"
        model = f"T5-{setting['t5']}, {'template' if setting.get('template') else 'no template'}" \
            if "t5" in setting else "MiniLM"
        ax.set_title(f"{setting['task']} ({where}; {model}):\nsimultaneous (blue) | sequential (orange)", fontsize=8)
    save_figure(fig, path, f"combinations of P, B, A, {payload['mode']} setting, seeds {payload['seeds']}")


def configure(p) -> None:
    p.add_argument("--only", nargs="+", metavar="SETTING",
                   help="measure only these data settings (e.g. sst2-16shot); finished runs are reused later")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
