"""Combinations of delta-tuning methods (Ding et al. 2023, §"Combinations of delta-tuning methods", Table 5), on
the study protocol.

Three deltas act at different sites of the frozen all-MiniLM-L6-v2, read through the frozen label-word head (so
nothing but δ trains): prompt tuning (P, soft tokens before the input), BitFit (B, the biases) and adapters (A,
bottleneck MLPs after the sublayers). Two ways of using several of them:

* simultaneous: every non-empty subset S of {P, B, A} is attached at once and trained together (one learning rate,
  chosen from the subset's grid on the selection split);
* sequential: every order X → Y → Z of the three. Stage 1 is X's own simultaneous run; stage k trains its method
  on top of the earlier stages' best δ, attached and frozen (``RunSpec.after``), with the learning rate its
  method won alone on the same split, and stops on the selection split like every run.

Seed s is the LM-BFF split ``16-s`` of SST-2: its train file trains, its dev file (the selection split) chooses
the learning rate and the stopping step, and the task's test set (the report split, never seen by a choice) gives
the number. The claims are read by the rules stated in README.md before the run.

    python experiments/combinations/run.py --quick
    python experiments/combinations/run.py                   # the full study (resumable)
    python experiments/combinations/run.py --seeds 13        # only this seed
"""

from __future__ import annotations

import sys
from itertools import combinations, permutations
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import json  # noqa: E402

from deltactl.experiments import kshot, runner  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.study import finish_bars, main, plot_verdicts, save_figure, threads, work_dir  # noqa: E402

LETTER = {"prompt": "P", "bitfit": "B", "adapter": "A"}
BEST_SINGLE = "best single"  # per seed, the single method with the best selection accuracy
PAPER = (
    "Ding et al. 2023, Table 5 (RoBERTa-large, GLUE/SuperGLUE): simultaneous - combining methods is generally "
    "better than any single one (adapter+BitFit, or all three, are the strongest); prompt tuning added to the "
    "others hurts without a manual template and helps only in the few-shot setting with one. "
    "Sequential (P -> B -> A, earlier stages frozen) - adding a stage can improve on the previous one but does "
    "not always; there is no order that always helps."
)


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the setting's seeds to train, evaluate and report")


def label(methods) -> str:
    """``("prompt", "adapter")`` → ``P+A``."""
    return "+".join(LETTER[m] for m in methods)


def chain_label(order) -> str:
    """``("prompt", "bitfit")`` → ``P→B``."""
    return "→".join(LETTER[m] for m in order)


def subsets(parts) -> list[tuple]:
    """Every non-empty subset of ``parts``, smallest first, in the order of ``parts`` within a subset."""
    return [c for k in range(1, len(parts) + 1) for c in combinations(parts, k)]


def measure(cfg: dict, args) -> dict:
    threads()
    task = cfg["task"]
    # the report split drops what any seed of the setting trains or chooses on: the same whichever seeds run
    fitting, report, dropped = kshot.splits([task], cfg["seeds"], args.data, cfg["report_examples"])
    cfg = kshot.only_seeds(cfg, getattr(args, "seeds", None))
    work = work_dir("combinations", args)
    runs = []
    for seed in cfg["seeds"]:
        single = {}
        for parts in subsets(cfg["parts"]):
            row = chosen_run(cfg, parts, seed, fitting, report[task], work, args.data)
            runs.append(row)
            if len(parts) == 1:
                single[parts[0]] = row
        for order in permutations(cfg["parts"]):
            after = Path(single[order[0]]["folder"])
            for k in range(1, len(order)):
                row = stage_run(cfg, order[: k + 1], single[order[k]]["lr"], after, seed, fitting, report[task],
                                work, args.data)
                runs.append(row)
                after = Path(row["folder"])
    performance = runner.load_script("performance")
    zero = performance.zero_shot(cfg, task, report[task], work, args.data)
    return {"seeds": cfg["seeds"], "paper": PAPER, "head": kshot.HEAD, "model": "all-MiniLM-L6-v2", "task": task,
            "zero_shot": zero, "protocol": kshot.protocol_record(fitting, report, dropped, cfg["seeds"]),
            "runs": runs, "table": table(runs), "verdicts": verdicts(runs, cfg),
            "reading": reading(verdicts(runs, cfg)),
            "compute_seconds": round(sum(r["seconds"] for r in runs), 1)}  # every lr of every grid


def chosen_run(cfg, parts, seed, fitting, report, work, data) -> dict:
    """A subset trained simultaneously: every lr of its grid to a plateau, the best on the selection split, that
    run's δ scored on the report split."""
    method = "+".join(parts)
    grid = [float(lr) for lr in cfg["lr_grid"][label(parts)]]
    options = _options(cfg, parts)
    records, folders = {}, {}
    for lr in grid:
        folders[lr] = work / "runs" / f"{cfg['task']}-seed{seed}-{label(parts)}-lr{lr:g}"
        records[lr] = kshot.train_to_plateau(method, options, cfg["task"], seed, lr, cfg["train"], fitting,
                                             folders[lr], data)
    best, scores = kshot.choose_lr(grid, records, f"{label(parts)}, seed {seed} ({folders[grid[0]].parent})")
    return _row(cfg, "simultaneous", label(parts), parts, seed, best, records[best], folders[best], report, data,
                seconds=sum(r["seconds"] for r in records.values()), selection_scores=scores)


def stage_run(cfg, order, lr, after, seed, fitting, report, work, data) -> dict:
    """The last stage of ``order``: its method trained on top of the earlier stages (``after``, frozen)."""
    method = order[-1]
    folder = work / "runs" / f"{cfg['task']}-seed{seed}-seq-{'-'.join(LETTER[m] for m in order)}-lr{lr:g}"
    record = kshot.train_to_plateau(method, _options(cfg, (method,)), cfg["task"], seed, lr, cfg["train"], fitting,
                                    folder, data, after=after)
    if record["selection_accuracy"] is None:
        raise ValueError(f"{chain_label(order)}, seed {seed}: the stage diverged before its first evaluation at lr "
                         f"{lr:g} ({folder}); see its log.jsonl")
    return _row(cfg, "sequential", chain_label(order), order, seed, lr, record, folder, report, data,
                seconds=record["seconds"], selection_scores={lr: record["selection_accuracy"]})


def _options(cfg: dict, parts) -> dict | None:
    """The method options of one part, or of each part of a combination by name."""
    if len(parts) == 1:
        return cfg["method_options"].get(parts[0])
    return {p: cfg["method_options"][p] for p in parts if p in cfg["method_options"]} or None


def _row(cfg, kind, name, parts, seed, lr, record, folder, report, data, seconds, selection_scores) -> dict:
    """The study's record of a chosen run; its report accuracy is cached beside the run, keyed by the split."""
    stored = folder / "evaluation.json"
    key = {"report": pr.split_keys(report), "run": record["key"],
           "delta": kshot.file_digest(folder / "best" / kshot.BEST)}  # a run retrained under its key is scored anew
    evaluation = json.loads(stored.read_text()) if stored.exists() else {}
    if evaluation.get("key") != key:
        run_spec = kshot.spec(record["method"], cfg["task"], seed, lr, cfg["train"], record["key"]["options"],
                              after=json.loads((folder / "run.json").read_text()).get("after"))
        evaluation = {"key": key, **kshot.score_best(run_spec, folder, data, {"report": report})}
        kshot.write_json(stored, evaluation)
    row = {"method": name, "kind": kind, "parts": list(parts), "seed": seed, "lr": lr,
           "selection_scores": {f"{k:g}": v for k, v in selection_scores.items()},
           "selection_accuracy": record["selection_accuracy"], "report_accuracy": evaluation["report"],
           "best_step": record["best_step"], "steps": record["steps"], "status": record["status"],
           "trainable_parameters": record["trainable_parameters"], "seconds": round(seconds, 1),
           "folder": str(folder)}
    print(f"seed {seed} {kind} {name}: lr {lr:g}, selection {row['selection_accuracy']:.4f}, report "
          f"{row['report_accuracy']:.4f}, {row['steps']} steps, {row['seconds']} s", flush=True)
    return row


# -------------------------------------------------------------------------------------------- table, verdicts

def per_seed(runs: list[dict], method: str, field: str = "report_accuracy") -> list[float]:
    """``field`` of ``method`` (a run's label, or BEST_SINGLE) per seed, in seed order."""
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        if method == BEST_SINGLE:  # chosen per seed on the selection split; ties go to the earlier part
            singles = [r for r in runs if r["seed"] == seed and r["kind"] == "simultaneous" and len(r["parts"]) == 1]
            chosen = max(singles, key=lambda r: (kshot.selection_score(r), -singles.index(r)))
            out.append(chosen[field])
            continue
        matches = [r[field] for r in runs if r["seed"] == seed and r["method"] == method]
        if len(matches) != 1:
            raise ValueError(f"seed {seed}: {len(matches)} runs of {method}; expected one")
        out.append(matches[0])
    return out


def table(runs: list[dict]) -> list[dict]:
    """One row per subset and per sequential chain: report accuracy, mean and interval over seeds."""
    names = list(dict.fromkeys((r["kind"], r["method"]) for r in runs))
    return [{"method": name, "kind": kind, "quantity": "report_accuracy",
             "summary": pr.summary(per_seed(runs, name)).to_dict()} for kind, name in names]


# The claims and rules of README.md, stated before the full run: (id, claim, a, b); every rule is BetterRule
CLAIMS = (
    ("K1", "adding adapters to BitFit raises accuracy", "B+A", "B"),
    ("K2", "adding BitFit to adapters raises accuracy", "B+A", "A"),
    ("K3", "all three together beat the best single method", "P+B+A", BEST_SINGLE),
    ("K4", "adding prompt tuning (no template) to B+A lowers accuracy", "B+A", "P+B+A"),
    *((f"Q{i + 1}", f"the chain {chain_label(o)} beats its first stage {LETTER[o[0]]} alone", chain_label(o),
       LETTER[o[0]]) for i, o in enumerate(permutations(("prompt", "bitfit", "adapter")))),
)


def verdicts(runs: list[dict], cfg: dict) -> list[dict]:
    present = {r["method"] for r in runs} | {BEST_SINGLE}
    out = []
    for claim_id, claim, a, b in CLAIMS:
        if a not in present or b not in present:
            continue  # the quick setting runs two of the parts
        rule = pr.BetterRule()
        difference = pr.paired_summary(per_seed(runs, a), per_seed(runs, b))
        out.append({"id": claim_id, "claim": claim, "quantity": "report_accuracy", "a": a, "b": b,
                    "rule": pr.rule_record(rule), "difference": difference.to_dict(),
                    "verdict": rule.verdict(difference)})
    return out


def reading(found: list[dict]) -> dict:
    """The paper's sequential finding ("a stage can help, no order always does"), read from Q1–Q6 as README.md
    states: it agrees if at least one chain beats its first stage and at least one does not."""
    chains = [v["verdict"] for v in found if v["id"].startswith("Q")]
    if len(chains) < 6:
        return {"sequential": "not read", "why": "the setting runs fewer than all six orders"}
    helped = chains.count("agrees")
    verdict = "agrees" if 0 < helped < len(chains) else "disagrees"
    return {"sequential": verdict, "chains_that_beat_their_first_stage": helped, "chains": len(chains)}


# ------------------------------------------------------------------------------------------------------ plot

def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = payload["table"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [1.5, 1]})
    ax = axes[0]
    colours = {"simultaneous": "tab:blue", "sequential": "tab:orange"}
    for i, row in enumerate(rows):
        cell = row["summary"]
        ax.bar(i, cell["mean"], 0.7, color=colours[row["kind"]],
               yerr=[[cell["mean"] - cell["low"]], [cell["high"] - cell["mean"]]], capsize=3,
               label=row["kind"] if row["kind"] not in [r["kind"] for r in rows[:i]] else None)
    ax.axhline(payload["zero_shot"], color="grey", ls="--", lw=0.8, label="no δ (zero-shot)")
    finish_bars(ax, [r["method"] for r in rows], "report accuracy",
                f"{payload['task']} 16-shot: mean [95% CI] over splits {payload['seeds']}", rotation=40)
    plot_verdicts(axes[1], payload["verdicts"], "difference a − b in report accuracy (95% bootstrap CI over seeds)")
    axes[1].set_title("claims (rules in experiments/combinations/README.md)", fontsize=9)
    save_figure(fig, path, f"combinations of P, B, A, all-MiniLM-L6-v2 ({payload.get('head')} head), "
                           f"{payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
