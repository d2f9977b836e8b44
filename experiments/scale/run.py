"""The power of scale (Ding et al. 2023, §4.2, Fig. 6), on the study protocol, with what is available offline.

No pre-trained model family of several sizes installs here, and T5s pre-trained on two CPU cores stay at chance
for every method, so they can say nothing about scale. What is available is one real pre-trained encoder,
all-MiniLM-L6-v2: its depth-truncated variants (the embeddings and the first k of its 6 blocks, k = 2, 4, 6) are
models of 3 sizes that share the same pre-trained weights. Every method trains on each of them exactly as in the
performance study (frozen label-word head, LM-BFF 16-shot splits as seeds, lr and stopping step chosen on the
split's dev file, accuracy on the task's test set); the 6-block runs are the performance study's own.

What this can show: whether the distance between a delta method and FT shrinks as more pre-trained depth is kept.
What it cannot: truncation is not scaling (the paper's models were each pre-trained at their size, and a
truncated encoder's top block was never trained to be read directly), and 22M parameters are far below the
paper's T5-XXL.

    python experiments/scale/run.py --quick
    python experiments/scale/run.py                   # the full study (resumable)
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments import kshot  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.runner import load_script  # noqa: E402
from deltactl.experiments.study import (  # noqa: E402
    main,
    mode,
    plot_verdicts,
    save_figure,
    settings,
    threads,
    work_dir,
)

PAPER = ("Ding et al. 2023, Fig. 6 (T5-small, -base, -XXL): the performance of delta tuning approaches FT as the "
         "model grows; at T5-XXL all methods, prompt tuning included, come close to FT")
FULL_DEPTH = 6  # all-MiniLM-L6-v2's blocks


def performance_study():
    """experiments/performance/run.py as a module: its runs, evaluation and cache are this study's too."""
    return load_script("performance", HERE.parent)


def truncated(depth: int, folder: Path) -> str | None:
    """A checkpoint folder of all-MiniLM-L6-v2 with its first ``depth`` blocks (None: the whole model)."""
    if depth == FULL_DEPTH:
        return None
    from transformers import AutoModel, AutoTokenizer

    from deltactl.train.run import default_model_path

    if depth < 1 or depth > FULL_DEPTH:
        raise ValueError(f"depth {depth}: all-MiniLM-L6-v2 has blocks 1..{FULL_DEPTH}")
    target = folder / f"minilm-L{depth}"
    if (target / "config.json").exists():
        return str(target)
    model = AutoModel.from_pretrained(default_model_path(), local_files_only=True)
    model.encoder.layer = model.encoder.layer[:depth]
    model.config.num_hidden_layers = depth
    partial = folder / f".minilm-L{depth}.partial"  # written whole, then renamed: never a half checkpoint
    model.save_pretrained(partial)
    AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True).save_pretrained(partial)
    partial.rename(target)
    return str(target)


def check_shared(cfg: dict, args) -> None:
    """The full-depth runs live in the performance study's cache, keyed by their settings: settings that differ
    from that study's would make each study clear the other's runs, so they are refused."""
    theirs = settings(HERE.parent / "performance", mode(args))
    differing = [name for name in ("train", "report_examples", "curve_evals") if cfg.get(name) != theirs.get(name)]
    differing += [f"{name}[{m}]" for name in ("lr_grid", "method_options") for m in cfg["methods"]
                  if cfg[name].get(m) != theirs[name].get(m)]
    if differing:
        raise ValueError(f"experiments/scale/config.json ({mode(args)}) differs from the performance study's setting "
                         f"in {', '.join(differing)}; the full-depth runs are that study's, so keep them equal")


def measure(cfg: dict, args) -> dict:
    threads()
    check_shared(cfg, args)
    performance = performance_study()
    fitting, report, dropped = kshot.splits(cfg["tasks"], cfg["seeds"], args.data, cfg.get("report_examples"))
    work = work_dir("scale", args)
    work.mkdir(parents=True, exist_ok=True)
    shared = work_dir("performance", args)  # the full-depth runs: the performance study's
    models = {depth: truncated(depth, work) for depth in cfg["depths"]}
    runs, zero = [], {}
    # the full depth last: those runs are the performance study's, most often already in its cache
    for depth, model in sorted(models.items(), key=lambda item: item[1] is None):
        folder = shared if model is None else work / f"L{depth}"
        for seed in cfg["seeds"]:
            for task in cfg["tasks"]:
                for method in cfg["methods"]:
                    row = performance.chosen_run(cfg, method, task, seed, fitting, report, folder, args.data, model)
                    runs.append({**row, "depth": depth})
    for depth, model in models.items():
        folder = shared if model is None else work / f"L{depth}"
        zero[str(depth)] = {t: performance.zero_shot(cfg, t, report[t], folder, args.data, model) for t in cfg["tasks"]}
    parameters = {str(d): parameter_count(m) for d, m in models.items()}
    return {"seeds": cfg["seeds"], "paper": PAPER, "head": kshot.HEAD, "model": "all-MiniLM-L6-v2, truncated",
            "parameters": parameters, "zero_shot": zero,
            "protocol": kshot.protocol_record(fitting, report, dropped, cfg["seeds"]),
            "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
            "table": table(runs, cfg), "verdicts": verdicts(runs, cfg),
            "compute_seconds": round(sum(r["seconds"] for r in runs), 1)}


def parameter_count(model: str | None) -> int:
    from transformers import AutoConfig, AutoModel

    from deltactl.train.run import default_model_path

    config = AutoConfig.from_pretrained(model or default_model_path(), local_files_only=True)
    return sum(p.numel() for p in AutoModel.from_config(config).parameters())


def accuracy(runs: list[dict], depth: int, method: str) -> list[float]:
    """Per seed (in order): the report accuracy at ``depth``, mean over the tasks."""
    out = []
    for seed in sorted({r["seed"] for r in runs}):
        values = [r["report_accuracy"] for r in runs if (r["depth"], r["method"], r["seed"]) == (depth, method, seed)]
        out.append(sum(values) / len(values))
    return out


def table(runs: list[dict], cfg: dict) -> list[dict]:
    return [{"method": method, "depth": depth, "quantity": "report_accuracy",
             "summary": pr.summary(accuracy(runs, depth, method)).to_dict()}
            for depth in cfg["depths"] for method in cfg["methods"]]


# The claims and rules of README.md, stated before the full run
FT, MARGIN = "ft", 0.03


def verdicts(runs: list[dict], cfg: dict) -> list[dict]:
    small, large = min(cfg["depths"]), max(cfg["depths"])
    claims = [("S0", f"(precondition) FT gains from depth: FT at {large} blocks − FT at {small}",
               [a - b for a, b in zip(accuracy(runs, large, FT), accuracy(runs, small, FT))], pr.BetterRule())]
    for k, method in enumerate(m for m in cfg["methods"] if m != FT):
        gap_small = [f - m for f, m in zip(accuracy(runs, small, FT), accuracy(runs, small, method))]
        gap_large = [f - m for f, m in zip(accuracy(runs, large, FT), accuracy(runs, large, method))]
        claims.append((f"S{k + 1}", f"the FT − {method} gap shrinks with depth: gap at {small} blocks − gap at "
                       f"{large}", [a - b for a, b in zip(gap_small, gap_large)], pr.BetterRule()))
        claims.append((f"M{k + 1}", f"{method} matches FT at {large} blocks",
                       [-g for g in gap_large], pr.MatchRule(MARGIN)))
    out = []
    for claim_id, claim, values, rule in claims:
        difference = pr.summary(values)
        out.append({"id": claim_id, "claim": claim, "rule": pr.rule_record(rule), "difference":
                    difference.to_dict(), "verdict": rule.verdict(difference)})
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    labels = performance_study().LABELS
    rows = payload["table"]
    fig, (ax, ax_claims) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1, 1.2]})
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = sorted((r["depth"], r["summary"]) for r in rows if r["method"] == method)
        xs = [d for d, _ in cells]
        ax.errorbar(xs, [c["mean"] for _, c in cells], yerr=[[c["mean"] - c["low"] for _, c in cells],
                                                             [c["high"] - c["mean"] for _, c in cells]],
                    marker="o", capsize=3, label=labels.get(method, method))
    for depth, values in payload["zero_shot"].items():
        ax.scatter([int(depth)], [sum(values.values()) / len(values)], marker="x", color="k",
                   label="without δ" if depth == min(payload["zero_shot"], key=int) else None)
    depths = sorted(int(d) for d in payload["parameters"])
    ax.set_xticks(depths, [f"{d} blocks\n{payload['parameters'][str(d)] / 1e6:.1f}M" for d in depths], fontsize=8)
    ax.set_xlabel("all-MiniLM-L6-v2 truncated to its first blocks (parameters)", fontsize=8)
    ax.set_ylabel("report accuracy, mean over tasks [95% CI]", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plot_verdicts(ax_claims, payload["verdicts"], "accuracy difference, 95% CI over seeds (rules in "
                  "experiments/scale/README.md)")
    save_figure(fig, path, f"scale by truncation, all-MiniLM-L6-v2 ({payload.get('head')} head), 16-shot splits as "
                           f"seeds {payload['seeds']}, {payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot))
