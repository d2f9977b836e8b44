"""Intrinsic dimension on the study protocol (Aghajanyan, Zettlemoyer & Gupta, ACL 2021; Ding et al. 2023): how
much of full fine-tuning's gain a random d-dimensional subspace of the weights recovers, and d90 of that gain.

For each model and LM-BFF 16-shot split (the seeds): the zero-shot model (d = 0: the encoder read through the
frozen label-word head, nothing trained) is the start; full fine-tuning (FT) of the weights is the reference; DID
(θ = θ₀ + P z, a Fastfood projection, only z trains) at each d of the model's grid trains the same weights inside
the subspace. Every run trains to a plateau (early stopping on the split's 16-shot dev file, the *selection*
split) at each learning rate of its grid, the rate is chosen on the selection split, and the chosen run's best δ
is scored once on the task's test set (the *report* split). The gain of a run is its report accuracy minus the
zero-shot report accuracy; d90 (per seed) is the smallest d of the grid whose gain reaches 90 % of FT's gain, and
exists only where FT learned (``learning``). The claims are read by the rules of README.md, stated before the run.

Models: all-MiniLM-L6-v2 (pre-trained) and the same architecture from a random initialisation (seeded by the
split seed): the control for "pre-training lowers the intrinsic dimension". The word-embedding table is excluded
from FT and from the subspace (most of a small model's weights, and rows a 32-example training set never uses).
DID's learning rate is scale / √d (each Adam step then moves the weights by about ``scale`` in norm, P having unit
columns), with ``scale`` from the grid; FT's learning rate from its own grid.

    python experiments/intrinsic_dimension/run.py --quick
    python experiments/intrinsic_dimension/run.py               # the full study (resumable)
    python experiments/intrinsic_dimension/run.py --seeds 13,21 # only these seeds
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import torch  # noqa: E402

from deltactl.experiments import kshot  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.study import main, plot_verdicts, save_figure, threads, work_dir  # noqa: E402

PAPER = ("Aghajanyan et al. 2021 (ACL), Ding et al. 2023: a pre-trained model is tuned to 90 % of full fine-tuning "
         "in a random subspace of a few hundred to a few thousand dimensions (d90 ≈ 200-2,000 for BERT/RoBERTa on "
         "MRPC, QQP), and pre-training lowers that intrinsic dimension")
FT = "ft"  # the reference run; a DID run is named by its d
PRETRAINED, RANDOM = "MiniLM", "MiniLM (random init)"
SHARE = 0.9


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the setting's seeds to train, evaluate and report")


# -------------------------------------------------------------------------------------------------- the runs

def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace("(", "").replace(")", "")


def run_folder(work: Path, model: str, task: str, seed: int, point, lr: float) -> Path:
    what = FT if point == FT else f"d{point}"
    return work / "runs" / f"{slug(model)}-{task}-seed{seed}-{what}-lr{lr:g}"


def identity(entry: dict) -> dict:
    """What defines a model's weights (not the grid it is run on)."""
    return {"name": entry["name"], "random_init": bool(entry.get("random_init"))}


def grid(cfg: dict, point) -> list[float]:
    """The learning rates tried at ``point`` (FT, or a d: scale / √d for each scale of the grid)."""
    if point == FT:
        return [float(lr) for lr in cfg["lr_grid"]["ft"]]
    return [float(f"{s / math.sqrt(point):.6g}") for s in cfg["lr_grid"]["did_scale"]]


def build(entry: dict, task: str, seed: int, cfg: dict, data):
    """The task model (encoder + frozen label-word head) of one model entry, fresh."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from deltactl.tasks import get_task
    from deltactl.train.models import classifier
    from deltactl.train.run import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if entry.get("random_init"):
        torch.manual_seed(seed)  # the random init follows the split seed: seed i varies the data and the init
        encoder = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True),
                                        attn_implementation="eager")
    else:
        encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    encoder.eval()
    return classifier(get_task(task, data=data, kshot_seed=seed), encoder, tokenizer, cfg["train"]["max_length"],
                      head=kshot.HEAD)


def attach(task_model, point, seed: int, cfg: dict):
    """(the module to call, its trainable tensors): FT trains every weight outside ``exclude``; DID a z of size d
    (Fastfood projection seeded by the split seed) over the same weights."""
    from deltactl.subspace import intrinsic

    model = task_model.model
    if point == FT:
        trainable = {n: p for n, p in model.named_parameters()
                     if not any(fnmatchcase(n, pattern) for pattern in cfg["exclude"])}
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        return model, trainable
    sub = intrinsic(model, int(point), seed=seed, exclude=tuple(cfg["exclude"]))
    return sub, sub.trainable()


def train_to_plateau(entry: dict, task: str, seed: int, point, lr: float, cfg: dict, fitting: dict, folder: Path,
                     data) -> dict:
    """Train at ``point`` with ``lr`` until the selection accuracy stops improving (``patience`` evaluations without
    a gain, at most ``max_epochs``); the record, cached in ``folder/result.json`` (a folder holding another
    setting's run is cleared). The best δ is kept in ``folder/best/trainable.safetensors``."""
    from deltactl.train.loop import TrainConfig

    key = {"model": identity(entry), "task": task, "seed": seed, "point": point, "lr": lr, "train": cfg["train"],
           "exclude": cfg["exclude"]}

    def prepare():
        task_model = build(entry, task, seed, cfg, data)
        model, trainable = attach(task_model, point, seed, cfg)
        train = cfg["train"]
        config = TrainConfig(lr=lr, epochs=float(train["max_epochs"]), batch_size=train["batch_size"],
                             eval_every=train["eval_every"], patience=train["patience"], seed=seed)
        return model, trainable, task_model, config

    return kshot.plateau(key, folder, prepare, fitting[(task, seed)]["train"], fitting[(task, seed)]["dev"],
                         {"model": entry["name"], "task": task, "seed": seed, "point": point, "lr": lr})


def report_accuracy(entry: dict, task: str, seed: int, point, cfg: dict, folder: Path, report: list, data) -> float:
    """Accuracy of the run's best δ on the report split (the chosen run only)."""
    task_model = build(entry, task, seed, cfg, data)
    model, trainable = attach(task_model, point, seed, cfg)
    with torch.no_grad():
        for name, value in kshot.best_delta(folder).items():
            trainable[name].copy_(value)
    model.eval()
    with torch.no_grad():
        return task_model.evaluate(model, report, 64)["accuracy"]


def chosen_run(entry: dict, task: str, seed: int, point, cfg: dict, fitting: dict, report: dict, work: Path,
               data) -> dict:
    """Every lr of the point's grid to a plateau, the lr chosen on the selection split (ties to the earlier), the
    chosen δ scored on the report split (cached beside the chosen run)."""
    lrs = grid(cfg, point)
    records = {lr: train_to_plateau(entry, task, seed, point, lr, cfg, fitting,
                                    run_folder(work, entry["name"], task, seed, point, lr), data) for lr in lrs}
    best, scores = kshot.choose_lr(lrs, records, f"{entry['name']} on {task}, seed {seed}, point {point}")
    folder = run_folder(work, entry["name"], task, seed, point, best)
    stored = folder / "evaluation.json"
    key = {"report": pr.split_keys(report[task]), "run": records[best]["key"]}
    evaluation = json.loads(stored.read_text()) if stored.exists() else {}
    if evaluation.get("key") != key:
        started = time.perf_counter()
        evaluation = {"key": key, "report": report_accuracy(entry, task, seed, point, cfg, folder, report[task], data),
                      "seconds": round(time.perf_counter() - started, 1)}
        kshot.write_json(stored, evaluation)
    if point == FT and cfg.get("prune", True):  # an encoder's weights are 44 MB a run: keep the numbers
        for lr in lrs:
            shutil.rmtree(run_folder(work, entry["name"], task, seed, point, lr) / "best", ignore_errors=True)
    chosen = records[best]
    row = {"model": entry["name"], "task": task, "seed": seed, "point": point, "lr": best,
           "selection_scores": {f"{k:g}": v for k, v in scores.items()},
           "selection_accuracy": chosen["selection_accuracy"], "report_accuracy": evaluation["report"],
           "best_step": chosen["best_step"], "steps": chosen["steps"], "status": chosen["status"],
           "steps_by_lr": {f"{k:g}": r["steps"] for k, r in records.items()},
           "trainable_parameters": chosen["trainable_parameters"],
           "seconds": round(sum(r["seconds"] for r in records.values()) + evaluation["seconds"], 1)}
    print(f"seed {seed} {task} {entry['name']} {point}: lr {best:g}, selection {row['selection_accuracy']:.4f}, "
          f"report {row['report_accuracy']:.4f}, {row['steps']} steps, {row['seconds']:.0f} s", flush=True)
    return row


def zero_shot(entry: dict, task: str, seed: int, cfg: dict, report: dict, work: Path, data) -> dict:
    """Report accuracy of the untrained model through the same head (d = 0): where every run starts. The
    pre-trained model's is the same for every seed (measured once); the random init follows the seed."""
    own = f"-seed{seed}" if entry.get("random_init") else ""
    stored = work / f"zero-shot-{slug(entry['name'])}-{task}{own}.json"
    key = {"report": pr.split_keys(report[task]), "model": identity(entry), "max_length": cfg["train"]["max_length"],
           **({"seed": seed} if own else {})}
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return {**json.loads(stored.read_text()), "seed": seed}
    started = time.perf_counter()
    task_model = build(entry, task, seed, cfg, data)
    with torch.no_grad():
        accuracy = task_model.evaluate(task_model.model, report[task], 64)["accuracy"]
    record = {"key": key, "model": entry["name"], "task": task, "seed": seed, "point": 0, "report_accuracy": accuracy,
              "seconds": round(time.perf_counter() - started, 1)}
    stored.parent.mkdir(parents=True, exist_ok=True)
    kshot.write_json(stored, record)
    return record


def measure(cfg: dict, args) -> dict:
    threads()
    fitting, report, dropped = kshot.splits(cfg["tasks"], cfg["seeds"], args.data, cfg.get("report_examples"))
    cfg = kshot.only_seeds(cfg, getattr(args, "seeds", None))
    work = work_dir("intrinsic_dimension", args)
    runs, starts = [], []
    for seed in cfg["seeds"]:  # seed outermost: an interrupted study already holds whole seeds
        for task in cfg["tasks"]:
            for entry in cfg["models"]:
                starts.append(zero_shot(entry, task, seed, cfg, report, work, args.data))
                for point in [FT, *entry["dims"]]:
                    runs.append(chosen_run(entry, task, seed, point, cfg, fitting, report, work, args.data))
    points = per_seed_points(runs, starts, cfg)
    return {"seeds": cfg["seeds"], "paper": PAPER, "head": kshot.HEAD, "backbone": "all-MiniLM-L6-v2",
            "protocol": kshot.protocol_record(fitting, report, dropped, cfg["seeds"]),
            "zero_shot": starts, "runs": runs, "points": points, "table": table(points, cfg),
            "d90": d90_records(points, cfg, {t: len(e) for t, e in report.items()}),
            "verdicts": verdicts(points, cfg),
            "compute_seconds": round(sum(r["seconds"] for r in runs) + sum(
                {(s["model"], s["task"], s["seed"] if s["key"].get("seed") is not None else None): s["seconds"]
                 for s in starts}.values()), 1)}  # every lr of every grid; a shared zero-shot counted once


# ---------------------------------------------------------------------------------------- quantities per seed

def per_seed_points(runs: list[dict], starts: list[dict], cfg: dict) -> list[dict]:
    """One record per (model, task, seed, point) with its report accuracy and its gain over the zero-shot start
    (point 0: the start itself, gain 0)."""
    out = []
    for start in starts:
        same = [r for r in runs if (r["model"], r["task"], r["seed"]) == (start["model"], start["task"], start["seed"])]
        for point, accuracy in [(0, start["report_accuracy"]), *[(r["point"], r["report_accuracy"]) for r in same]]:
            out.append({"model": start["model"], "task": start["task"], "seed": start["seed"], "point": point,
                        "report_accuracy": accuracy, "gain": accuracy - start["report_accuracy"]})
    return out


def values(points: list[dict], model: str, point, field: str, seeds: list[int]) -> list[float]:
    """Per seed (in the setting's order): ``field`` at ``point`` averaged over the tasks."""
    out = []
    for seed in seeds:
        found = [p[field] for p in points if (p["model"], p["point"], p["seed"]) == (model, point, seed)]
        if not found:
            raise ValueError(f"no {model} run at {point} for seed {seed}")
        out.append(sum(found) / len(found))
    return out


def table(points: list[dict], cfg: dict) -> list[dict]:
    """One row per (model, point, quantity): mean and interval over seeds of the report accuracy and the gain."""
    rows = []
    for quantity in ("report_accuracy", "gain"):
        for entry in cfg["models"]:
            for point in [0, *entry["dims"], FT]:
                rows.append({"method": f"{entry['name']} {'d=0 (zero-shot)' if point == 0 else point}",
                             "model": entry["name"], "point": point, "quantity": quantity,
                             "summary": pr.summary(values(points, entry["name"], point, quantity, cfg["seeds"])
                                                   ).to_dict()})
    return rows


def learning(zero_shot: float, full: float, n: int, dims: list, curves: dict) -> dict:
    """Whether full fine-tuning learned anything, and d90 of the gain over zero-shot.

    d90 as the paper defines it (90 % of full fine-tuning's metric) is meaningful only where fine-tuning beat the
    zero-shot model: a model that learns nothing has every d "reach 90 %" of a chance-level metric. ``learned``
    asks for a gain above two standard errors of an accuracy on ``n`` examples (2·√(0.25/n)); ``gain_d90`` is
    then the smallest d closing 90 % of the gap zero-shot → full (None where nothing was learned, or where no d of
    the grid closes it).
    """
    from deltactl.subspace import d90_from_curve

    learned = full - zero_shot > 2 * math.sqrt(0.25 / n)
    gain = {m: d90_from_curve(dims, [x - zero_shot for x in v], full - zero_shot, SHARE).d90 if learned else None
            for m, v in curves.items()}
    return {"learned": learned, "gain_d90": gain}


def d90_records(points: list[dict], cfg: dict, sizes: dict) -> list[dict]:
    """Per (model, task): d90 of the gain per seed, and its summary.

    A seed's d90 is ``learning``'s: "reached" (a grid d), "beyond the grid" (no d closes 90 % of FT's gain: d90 >
    the largest d), or "undefined" (FT's gain is within 2 standard errors of 0: there is nothing to recover). The
    median treats "beyond the grid" as larger than every grid d; the mean of log10 d90 with its bootstrap
    interval enters "beyond the grid" as 10× the largest d (so it is then a lower bound), and is given only where
    no seed is "undefined"."""
    out = []
    for entry in cfg["models"]:
        dims = sorted(entry["dims"])
        for task in cfg["tasks"]:
            seeds = []
            for seed in cfg["seeds"]:
                at = {p["point"]: p["report_accuracy"] for p in points
                      if (p["model"], p["task"], p["seed"]) == (entry["name"], task, seed)}
                found = learning(at[0], at[FT], sizes[task], dims, {"DID": [at[d] for d in dims]})
                d90 = found["gain_d90"]["DID"]
                status = "undefined" if not found["learned"] else "reached" if d90 is not None else "beyond the grid"
                seeds.append({"seed": seed, "d90": d90, "status": status, "ft_gain": at[FT] - at[0]})
            ranks = [s["d90"] if s["status"] == "reached" else math.inf for s in seeds]
            record = {"model": entry["name"], "task": task, "dims": dims, "per_seed": seeds,
                      "beyond": 10 * dims[-1]}
            if any(s["status"] == "undefined" for s in seeds):
                record.update(median=None, log10_mean=None,
                              note="FT learned nothing on some seed: d90 is undefined there, so no summary")
            else:
                median = statistics.median(ranks)
                record["median"] = None if math.isinf(median) else median
                record["median_text"] = f"> {dims[-1]:,}" if math.isinf(median) else f"{median:,g}"
                logs = [math.log10(s["d90"] if s["status"] == "reached" else 10 * dims[-1]) for s in seeds]
                record["log10_mean"] = pr.summary(logs).to_dict()
                record["lower_bound"] = any(s["status"] == "beyond the grid" for s in seeds)
            out.append(record)
    return out


# ------------------------------------------------------------------------------------------- claims and rules

def claims(cfg: dict) -> list[tuple]:
    """The claims of README.md, stated before the full run: (id, claim, per-seed quantity, rule)."""
    d, high = cfg["claim_d"], cfg["claim_d_high"]
    return [
        ("D0", "full fine-tuning of the pre-trained model gains over its zero-shot start (precondition of D1)",
         lambda p, s: values(p, PRETRAINED, FT, "gain", s), pr.BetterRule()),
        ("D0r", "full fine-tuning of the random-init model gains over its start (precondition of D2)",
         lambda p, s: values(p, RANDOM, FT, "gain", s), pr.BetterRule()),
        ("D1", f"a subspace of d = {d:,} recovers ≥ 90 % of FT's gain (pre-trained): gain(d) − 0.9·gain(FT) > 0",
         lambda p, s: [g - SHARE * f for g, f in zip(values(p, PRETRAINED, d, "gain", s),
                                                     values(p, PRETRAINED, FT, "gain", s))], pr.BetterRule()),
        ("D1b", f"a subspace of d = {high:,} recovers ≥ 90 % of FT's gain (pre-trained)",
         lambda p, s: [g - SHARE * f for g, f in zip(values(p, PRETRAINED, high, "gain", s),
                                                     values(p, PRETRAINED, FT, "gain", s))], pr.BetterRule()),
        ("D2", f"pre-training lowers the intrinsic dimension: at d = {d:,} the pre-trained model recovers a larger "
               "share of its FT gain than the random-init model: g_pre(d)·G_rand − g_rand(d)·G_pre > 0",
         lambda p, s: cross_share(p, s, d), pr.BetterRule()),
        ("D2a", f"pre-training makes a d = {d:,} subspace gain more accuracy over the model's start: "
                "g_pre(d) − g_rand(d) > 0",
         lambda p, s: [a - b for a, b in zip(values(p, PRETRAINED, d, "gain", s), values(p, RANDOM, d, "gain", s))],
         pr.BetterRule()),
    ]


def cross_share(points: list[dict], seeds: list[int], d: int) -> list[float]:
    """Per seed g_pre(d)·G_rand − g_rand(d)·G_pre, with G = max(FT's gain, 0): the sign of share_pre − share_rand
    (share = g(d) / G) where both FT gains are positive, and defined (≈ 0, no finding) where one FT learned
    nothing, instead of a ratio with a denominator near 0."""
    g_pre, g_rand = values(points, PRETRAINED, d, "gain", seeds), values(points, RANDOM, d, "gain", seeds)
    f_pre = [max(0.0, v) for v in values(points, PRETRAINED, FT, "gain", seeds)]
    f_rand = [max(0.0, v) for v in values(points, RANDOM, FT, "gain", seeds)]
    return [a * fr - b * fp for a, b, fp, fr in zip(g_pre, g_rand, f_pre, f_rand)]


def verdicts(points: list[dict], cfg: dict) -> list[dict]:
    out = []
    have = {(p["model"], p["point"]) for p in points}
    needs = {"D0": [(PRETRAINED, FT)], "D0r": [(RANDOM, FT)], "D1": [(PRETRAINED, cfg["claim_d"])],
             "D1b": [(PRETRAINED, cfg["claim_d_high"])],
             "D2": [(PRETRAINED, cfg["claim_d"]), (RANDOM, cfg["claim_d"]), (RANDOM, FT)],
             "D2a": [(PRETRAINED, cfg["claim_d"]), (RANDOM, cfg["claim_d"])]}
    for claim_id, claim, quantity, rule in claims(cfg):
        if not all(n in have for n in needs[claim_id]):
            continue  # e.g. the quick setting runs only some models and dims
        difference = pr.summary(quantity(points, cfg["seeds"]))
        out.append({"id": claim_id, "claim": claim, "rule": pr.rule_record(rule), "difference": difference.to_dict(),
                    "verdict": rule.verdict(difference)})
    return out


# ------------------------------------------------------------------------------------------------------ plot

def plot(payload: dict, path: Path) -> None:
    if "table" not in payload:
        return plot_before_protocol(payload, path)
    import matplotlib.pyplot as plt

    rows = payload["table"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    for ax, quantity, what in ((axes[0], "report_accuracy", "report accuracy"),
                               (axes[1], "gain", "gain over the zero-shot start (d = 0)")):
        for i, model in enumerate(models):
            cells = {r["point"]: r["summary"] for r in rows if r["model"] == model and r["quantity"] == quantity}
            dims = sorted(p for p in cells if p not in (0, FT))
            xmin = min(p for r in rows for p in [r["point"]] if p not in (0, FT)) / 10  # d = 0, one spot for all
            xs = [xmin, *dims]
            ys = [cells[0], *[cells[d] for d in dims]]
            ax.errorbar(xs, [c["mean"] for c in ys], yerr=[[c["mean"] - c["low"] for c in ys],
                                                          [c["high"] - c["mean"] for c in ys]],
                        fmt="o-", color=f"C{i}", capsize=3, label=f"{model}: DID (leftmost: d = 0)")
            full = cells[FT]
            ax.axhline(full["mean"], color=f"C{i}", ls="--", lw=1, label=f"{model}: FT (band: 95% CI)")
            ax.axhspan(full["low"], full["high"], color=f"C{i}", alpha=0.12)
            if quantity == "gain":
                ax.axhline(SHARE * full["mean"], color=f"C{i}", ls=":", lw=1, label=f"{model}: 0.9 × FT's gain")
        ax.set_xscale("log")
        ticks = sorted({p for r in rows for p in [r["point"]] if p not in (0, FT)})
        ax.set_xticks([ticks[0] / 10, *ticks], ["0", *[f"{d:,}" for d in ticks]])
        ax.minorticks_off()
        ax.set_xlabel("subspace dimension d (log; leftmost point: d = 0, the zero-shot model)", fontsize=8)
        ax.set_ylabel(what, fontsize=8)
        ax.set_title(f"{what}: mean [95% CI] over seeds", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    ax = axes[2]
    plot_verdicts(ax, payload["verdicts"], "per-seed quantity of the claim (README.md); 95% bootstrap CI over seeds",
                  labels=[f"{v['id']}: {v['verdict']}" for v in payload["verdicts"]])
    ax.set_title("claims (rules in experiments/intrinsic_dimension/README.md)", fontsize=9)
    save_figure(fig, path, f"intrinsic dimension, all-MiniLM-L6-v2 ({payload.get('head')} head), 16-shot splits as "
                           f"seeds {payload['seeds']}, {payload['mode']} setting")


def plot_before_protocol(results: dict, path: Path) -> None:
    """The figure of a results.json written before the study moved onto the protocol (one seed per curve)."""
    import matplotlib.pyplot as plt

    from deltactl.subspace import D90Result

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
                ax.plot(c.dims, c.metrics, "o-" if method == "DID" else "s--", color=f"C{i}",
                        label=f"{model} {method} (D {res['D']:,})")
            ax.axhline(res["full"], color=f"C{i}", ls=":", lw=1)
            ax.plot([c.dims[0] / 3], [res["zero_shot"]], "x", color=f"C{i}")
        ax.set_xscale("log")
        ax.set_xlabel("subspace dimension d (× at the left: d = 0, zero-shot; dotted: full fine-tuning)")
        ax.set_ylabel(res["metric"])
        ax.set_title(name)
        ax.legend(fontsize=6)
    save_figure(fig, path, f"intrinsic dimension across models, {results['mode']} setting (before the protocol)")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
