"""Performance and convergence of delta-tuning methods against full fine-tuning (Ding et al. 2023, §4.1, Fig. 3,
Table 2), on the study protocol.

Every method trains on all-MiniLM-L6-v2 through the frozen label-word head (nothing but δ trains, so a
comparison of methods is a comparison of their δ), on each LM-BFF 16-shot split: the split's train file trains,
its dev file (the selection split) chooses the learning rate from the method's grid and the stopping step (early
stopping with patience), and the task's test set (the report split, never seen by a choice) gives the number.
The five LM-BFF splits are the seeds; every cell is a mean with a bootstrap interval over them, differences are
paired by seed, and the claims are read by the rules stated in README.md before the run.

Convergence is the normalised area under the run's best-so-far selection accuracy over its first ``curve_evals``
evaluations (carried forward after an early stop): higher means good sooner.

The generalisation gap study (``experiments/generalisation_gap``) reads the same runs: each chosen run's best δ is
also scored on the training file it was trained on.

    python experiments/performance/run.py --quick
    python experiments/performance/run.py                   # the full study (resumable)
    python experiments/performance/run.py --seeds 13,21,42  # only these seeds
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import json  # noqa: E402

import torch  # noqa: E402

from deltactl.experiments import kshot  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.study import finish_bars, main, plot_verdicts, save_figure, threads, work_dir  # noqa: E402

LABELS = {"ft": "FT", "prompt": "PT", "prefix": "PF", "lora": "LR", "adapter": "AP", "bitfit": "BF",
          "last_layer": "LL", "selective": "SM"}
PAPER = ("Ding et al. 2023, Table 2 and Fig. 3 (T5-base, 100+ tasks): average performance FT > LR > AP > PF > PT, "
         "delta tuning close to FT except PT; convergence FT > AP ≈ LR > PF, PT slowest")
FT = "ft"


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the setting's seeds to train, evaluate and report")
    p.add_argument("--keep-runs", metavar="RESULTS_JSON",
                   help="an earlier results.json of the same setting: the runs it holds (of the seeds asked for) "
                        "join this run's table and verdicts as they are, instead of being trained again")


def grid(cfg: dict, method: str) -> list[float]:
    return [float(lr) for lr in cfg["lr_grid"][method]]


def run_folder(work: Path, task: str, method: str, seed: int, lr: float) -> Path:
    return work / "runs" / f"{task}-{method}-seed{seed}-lr{lr:g}"


def measure(cfg: dict, args) -> dict:
    threads()
    # the report split drops what any seed of the setting trains or chooses on: the same whichever seeds run
    fitting, report, dropped = kshot.splits(cfg["tasks"], cfg["seeds"], args.data, cfg.get("report_examples"))
    setting = cfg
    cfg = kshot.only_seeds(cfg, getattr(args, "seeds", None))
    seeds = cfg["seeds"]
    kept, provenance = kept_runs(getattr(args, "keep_runs", None), setting, seeds,
                                 lambda kept_seeds: kshot.protocol_record(fitting, report, dropped, kept_seeds))
    cfg = {**cfg, "seeds": [s for s in seeds if s not in {r["seed"] for r in kept}]}  # the seeds to train now
    work = work_dir("performance", args)
    runs = []
    for seed in cfg["seeds"]:  # seed outermost: an interrupted study already holds every method at the first seeds
        for task in cfg["tasks"]:
            for method in cfg["methods"]:
                runs.append(chosen_run(cfg, method, task, seed, fitting, report, work, args.data))
    runs = sorted(kept + runs, key=lambda r: seeds.index(r["seed"]))  # stable: the methods keep their order
    cfg = {**cfg, "seeds": seeds}
    zero = {task: zero_shot(cfg, task, report[task], work, args.data) for task in cfg["tasks"]}
    return {"seeds": seeds, "paper": PAPER, "head": kshot.HEAD, "model": "all-MiniLM-L6-v2", "zero_shot": zero,
            "protocol": kshot.protocol_record(fitting, report, dropped, seeds), **provenance,
            "runs": runs, "table": table(runs, cfg), "verdicts": verdicts(runs, cfg),
            "compute_seconds": round(sum(r["seconds"] for r in runs), 1)}  # every lr of the grid


def kept_runs(path: str | None, setting: dict, seeds: list[int], splits_of=None) -> tuple[list[dict], dict]:
    """(runs, provenance) taken from an earlier results.json of the same setting (``--keep-runs``): its runs of
    ``seeds``, which are then not trained again. ``splits_of(seeds)`` gives the protocol record of today's data for
    those seeds: their selection and report splits must be the stored ones, so runs made on other data never join.
    Another setting's results, other splits, a file holding none of ``seeds``, or a seed without exactly one run
    per (task, method), is an error that says so."""
    if not path:
        return [], {}
    stored = json.loads(Path(path).read_text())
    if stored.get("config") != setting:
        then = stored.get("config") or {}
        changed = sorted(k for k in set(setting) | set(then) if setting.get(k) != then.get(k))
        raise ValueError(f"--keep-runs {path} was made with other settings ({', '.join(changed)} differ from "
                         "config.json's); its runs cannot join these")
    runs = [r for r in stored["runs"] if r["seed"] in seeds]
    if not runs:
        raise ValueError(f"--keep-runs {path} holds seeds {stored['seeds']}, none of {seeds}; nothing to keep")
    kept = sorted({r["seed"] for r in runs})
    if splits_of is not None:
        now, then = splits_of(stored["seeds"]), stored.get("protocol", {})
        moved = [name for name in ("selection", "report") if now[name] != then.get(name)]
        if moved:
            raise ValueError(f"--keep-runs {path}: its {' and '.join(moved)} split differs from the data read now "
                             "(another --data folder, or changed files); its runs cannot join these")
    cells = [(r["seed"], r["task"], r["method"]) for r in runs]
    wanted = {(s, t, m) for s in kept for t in setting["tasks"] for m in setting["methods"]}
    if sorted(cells) != sorted(wanted):
        raise ValueError(f"--keep-runs {path}: seeds {kept} should hold one run per task and method of the setting; "
                         f"{len(cells)} runs for {len(wanted)} cells")
    return runs, {"kept_runs": {"from": str(path), "seeds": kept, "finished_utc": stored.get("finished_utc"),
                                "environment": stored.get("environment")}}


def chosen_run(cfg, method, task, seed, fitting, report, work, data, model=None) -> dict:
    """Train every lr of the method's grid, choose on the selection split, score the chosen δ on the report split
    and on its training file; the record (the evaluation cached beside the chosen run). ``model``: a checkpoint
    folder other than all-MiniLM-L6-v2 (the scale study's truncated encoders)."""
    records = {lr: kshot.train_to_plateau(method, cfg["method_options"].get(method), task, seed, lr, cfg["train"],
                                          fitting, run_folder(work, task, method, seed, lr), data, model=model)
               for lr in grid(cfg, method)}
    best, scores = kshot.choose_lr(grid(cfg, method), records, f"{method} on {task}, seed {seed} "
                                   f"({run_folder(work, task, method, seed, grid(cfg, method)[0]).parent})")
    folder = run_folder(work, task, method, seed, best)
    stored = folder / "evaluation.json"
    key = {"report": pr.split_keys(report[task]), "train": pr.split_keys(fitting[(task, seed)]["train"])}
    with kshot.folder_lock(work / "runs" / f"{task}-{method}-seed{seed}"):  # another study may score it too
        evaluation = json.loads(stored.read_text()) if stored.exists() else {}
        if evaluation.get("key") != key and not (folder / "best").exists():
            # scored before on other splits, its weights pruned since: train the grid again, then score it
            for lr in grid(cfg, method):
                shutil.rmtree(run_folder(work, task, method, seed, lr), ignore_errors=True)
            retrain = True
        else:
            retrain = False
    if retrain:
        return chosen_run(cfg, method, task, seed, fitting, report, work, data, model)
    with kshot.folder_lock(work / "runs" / f"{task}-{method}-seed{seed}"):
        evaluation = json.loads(stored.read_text()) if stored.exists() else {}
        if evaluation.get("key") != key:
            evaluation = {"key": key, **evaluate(cfg, method, task, seed, best, folder, report[task],
                                                 fitting[(task, seed)]["train"], data, model)}
            kshot.write_json(stored, evaluation)
        if cfg.get("prune", True):  # a fine-tuned encoder is 91 MB a run: keep the numbers, not the weights
            for lr in grid(cfg, method):
                shutil.rmtree(run_folder(work, task, method, seed, lr) / "best", ignore_errors=True)
    chosen = records[best]
    row = {"method": method, "task": task, "seed": seed, "lr": best,
           "selection_scores": {f"{k:g}": v for k, v in scores.items()},
           "selection_accuracy": chosen["selection_accuracy"], "report_accuracy": evaluation["report"],
           "train_accuracy": evaluation["train"], "best_step": chosen["best_step"], "steps": chosen["steps"],
           "status": chosen["status"], "curve": chosen["curve"], "convergence": convergence(chosen["curve"], cfg),
           "trainable_parameters": chosen["trainable_parameters"],
           "seconds": round(sum(r["seconds"] for r in records.values()), 1)}
    print(f"seed {seed} {task} {method}: lr {best:g}, report {row['report_accuracy']:.4f}, train "
          f"{row['train_accuracy']:.4f}, convergence {row['convergence']:.4f}, {row['steps']} steps", flush=True)
    return row


def evaluate(cfg, method, task, seed, lr, folder, report, train_set, data, model=None) -> dict:
    """Accuracy of the run's best δ on the report split and on the run's training file."""
    run_spec = kshot.spec(method, task, seed, lr, cfg["train"], cfg["method_options"].get(method), model=model)
    return kshot.score_best(run_spec, folder, data, {"report": report, "train": train_set})


def zero_shot(cfg, task, report, work, data, model=None) -> float:
    """Report accuracy of the backbone without δ through the same head: where every method starts."""
    stored = work / f"zero-shot-{task}.json"
    key = pr.split_keys(report)
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return json.loads(stored.read_text())["accuracy"]
    _, task_model, _ = kshot.run.build(kshot.spec(FT, task, cfg["seeds"][0], 1e-3, cfg["train"], None, model=model),
                                       data)
    task_model.model.eval()
    with torch.no_grad():
        accuracy = task_model.evaluate(task_model.model, report, 64)["accuracy"]
    stored.parent.mkdir(parents=True, exist_ok=True)
    kshot.write_json(stored, {"key": key, "accuracy": accuracy})
    return accuracy


def convergence(curve: list[dict], cfg: dict) -> float:
    """Mean of the best-so-far selection accuracy at evaluations 1..curve_evals (the last one carried forward
    after an early stop): the normalised area under the curve."""
    best, values = 0.0, []
    for entry in curve[: cfg["curve_evals"]]:
        best = max(best, entry["accuracy"])
        values.append(best)
    values += [best] * (cfg["curve_evals"] - len(values))
    return sum(values) / len(values)


# -------------------------------------------------------------------------------------------- table, verdicts

def per_seed(runs: list[dict], method: str, field: str, tasks: list[str] | None = None) -> list[float]:
    """Per seed (in order): the mean of ``field`` over the tasks (all of the setting's, or ``tasks``)."""
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for seed in seeds:
        values = [r[field] for r in runs if r["method"] == method and r["seed"] == seed
                  and (tasks is None or r["task"] in tasks)]
        out.append(sum(values) / len(values))
    return out


def table(runs: list[dict], cfg: dict) -> list[dict]:
    """One row per (task or the mean over tasks, method, quantity): mean and interval over seeds."""
    rows = []
    for quantity in ("report_accuracy", "convergence", "train_accuracy"):
        for task in [*cfg["tasks"], "mean"]:
            for method in cfg["methods"]:
                values = per_seed(runs, method, quantity, None if task == "mean" else [task])
                rows.append({"method": method, "task": task, "quantity": quantity,
                             "summary": pr.summary(values).to_dict()})
    return rows


# The claims and rules of README.md, stated before the full run: (id, claim, quantity, a, b, rule)
MARGIN = 0.03
CLAIMS = (
    ("P1", "LoRA matches FT", "report_accuracy", "lora", FT, pr.MatchRule(MARGIN)),
    ("P2", "adapter matches FT", "report_accuracy", "adapter", FT, pr.MatchRule(MARGIN)),
    ("P3", "prefix-tuning matches FT", "report_accuracy", "prefix", FT, pr.MatchRule(MARGIN)),
    ("P4", "BitFit matches FT", "report_accuracy", "bitfit", FT, pr.MatchRule(MARGIN)),
    ("P5", "FT beats prompt tuning", "report_accuracy", FT, "prompt", pr.BetterRule()),
    ("P6", "LoRA beats prompt tuning", "report_accuracy", "lora", "prompt", pr.BetterRule()),
    ("P7", "last-layer tuning matches FT", "report_accuracy", "last_layer", FT, pr.MatchRule(MARGIN)),
    ("P8", "selective-module tuning matches FT", "report_accuracy", "selective", FT, pr.MatchRule(MARGIN)),
    ("C1", "FT converges faster than prompt tuning", "convergence", FT, "prompt", pr.BetterRule()),
    ("C2", "LoRA converges faster than prompt tuning", "convergence", "lora", "prompt", pr.BetterRule()),
    ("C3", "adapter converges faster than prompt tuning", "convergence", "adapter", "prompt", pr.BetterRule()),
    ("C4", "FT converges faster than LoRA", "convergence", FT, "lora", pr.BetterRule()),
)


def verdicts(runs: list[dict], cfg: dict) -> list[dict]:
    out = []
    for claim_id, claim, quantity, a, b, rule in CLAIMS:
        if a not in cfg["methods"] or b not in cfg["methods"]:
            continue  # e.g. the quick setting runs only some methods
        difference = pr.paired_summary(per_seed(runs, a, quantity), per_seed(runs, b, quantity))
        out.append({"id": claim_id, "claim": claim, "quantity": quantity, "a": a, "b": b,
                    "rule": pr.rule_record(rule), "difference": difference.to_dict(),
                    "verdict": rule.verdict(difference)})
    return out


# ------------------------------------------------------------------------------------------------------ plot

def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = payload["table"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.2, 1, 1.1]})
    for ax, quantity, what in ((axes[0], "report_accuracy", "report accuracy"),
                               (axes[1], "convergence", "convergence (mean best-so-far selection accuracy)")):
        width = 0.8 / len(tasks)
        for k, task in enumerate(tasks):
            cells = [next(r["summary"] for r in rows if (r["quantity"], r["task"], r["method"]) ==
                          (quantity, task, m)) for m in methods]
            xs = [i + (k - (len(tasks) - 1) / 2) * width for i in range(len(methods))]
            ax.bar(xs, [c["mean"] for c in cells], width, label=task,
                   yerr=[[c["mean"] - c["low"] for c in cells], [c["high"] - c["mean"] for c in cells]], capsize=2)
        if quantity == "report_accuracy":
            for k, (task, value) in enumerate(payload.get("zero_shot", {}).items()):
                ax.axhline(value, color=f"C{k}", ls="--", lw=0.8, label=f"{task} without δ")
        finish_bars(ax, [LABELS.get(m, m) for m in methods], what, f"{what}: mean [95% CI] over seeds")
    plot_verdicts(axes[2], payload["verdicts"], "difference a − b (mean over tasks; 95% bootstrap CI over seeds)")
    axes[2].set_title("claims (rules in experiments/performance/README.md)", fontsize=9)
    save_figure(fig, path, f"performance and convergence, all-MiniLM-L6-v2 ({payload.get('head')} head), 16-shot "
                           f"splits as seeds {payload['seeds']}, {payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
