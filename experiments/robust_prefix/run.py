"""Robust prefix-tuning against text attacks (Yang & Liu, ICLR 2022) on all-MiniLM-L6-v2, on the study protocol.

Per seed: a seeded shuffle of the SST-2 train file gives three disjoint parts, the training examples, the
*selection* split (chooses the prefix's learning rate from a two-value grid and its stopping step: evaluation
every ``eval_every`` steps, ``patience`` evaluations without a gain, at most ``max_epochs`` epochs) and the
manifold examples (the canonical manifolds of the robust prefix are built from the correctly classified ones, and
the per-class universal trigger is searched on them against the plain prefix model). The prefix trains through the
frozen label-word head, so nothing but the prefix trains. The *report* split is the GLUE SST-2 dev set (872
sentences) less any sentence equal by content to an example some seed trains, selects or builds manifolds on; every
condition (clean, typo, word drop, word swap, trigger) is scored on it with the plain prefix P_θ and the robust
prefix P_θ + ψ. The robust prefix's own settings (N layers, Adam steps, lr) are fixed in config.json, not tuned.

Every cell is a mean over seeds with a 95% bootstrap interval; the claims of README.md (stated before the run) are
read by their rules on robust − plain, paired by seed.

    python experiments/robust_prefix/run.py --quick        # CI: one seed, tiny
    python experiments/robust_prefix/run.py                # the full study (resumable)
    python experiments/robust_prefix/run.py --seeds 0,1,2  # train only these seeds (every finished seed reports)
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

import torch  # noqa: E402

from deltactl.experiments import kshot  # noqa: E402
from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.finetune import subset  # noqa: E402
from deltactl.experiments.study import main, plot_verdicts, save_figure, threads, work_dir  # noqa: E402

TASK = "sst2"
METHOD = "prefix"
REPORT_FOLDER_SEED = 13  # the LM-BFF folder whose test file is read: the GLUE SST-2 dev set, the same in every folder
CONDITIONS = ("clean", "typo", "drop", "swap", "trigger")
KINDS = {"plain": "prefix P_θ", "robust": "robust prefix P_θ + ψ"}
PAPER = ("Yang & Liu, ICLR 2022 (GPT-2 medium prefix-tuning on SST-2, AG News, SNLI): the robust prefix keeps "
         "clean accuracy comparable to the plain prefix and substantially raises accuracy under five attacks of "
         "different types (character-, word- and sentence-level perturbations and universal adversarial triggers), "
         "its widest margins under universal adversarial triggers")

# The claims and rules of README.md, stated before the full run: (id, claim, condition, rule) on robust − plain
MARGIN = 0.03
CLAIMS = (
    ("R0", "robust prefix keeps clean accuracy", "clean", pr.MatchRule(MARGIN)),
    ("R1", "robust prefix raises accuracy under typos", "typo", pr.BetterRule()),
    ("R2", "robust prefix raises accuracy under word drop", "drop", pr.BetterRule()),
    ("R3", "robust prefix raises accuracy under word swap", "swap", pr.BetterRule()),
    ("R4", "robust prefix raises accuracy under a universal trigger", "trigger", pr.BetterRule()),
)


def configure(p) -> None:
    p.add_argument("--seeds", help="comma-separated subset of the setting's seeds to train and score (the others "
                                   "report if already finished)")


def digest(examples) -> str:
    """One hash of a split's content keys (a cache key that changes when any example does)."""
    return hashlib.sha256("\n".join(pr.split_keys(examples)).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ splits

def seed_parts(pool: list, seed: int, cfg: dict) -> dict:
    """Seed ``seed``'s training, selection and manifold examples: consecutive slices of a seeded shuffle of the
    (content-deduplicated) train file, so the three are disjoint by content."""
    shuffled = list(pool)
    random.Random(seed).shuffle(shuffled)
    n, s, m = cfg["train_examples"], cfg["selection_examples"], cfg["manifold_examples"]
    if n + s + m > len(shuffled):
        raise ValueError(f"{n} + {s} + {m} examples asked of a train file of {len(shuffled)}")
    return {"train": shuffled[:n], "selection": shuffled[n:n + s], "manifold": shuffled[n + s:n + s + m]}


def splits(cfg: dict, data) -> tuple[dict, list, int]:
    """(parts by seed, report split, report examples dropped as seen). The report split drops every GLUE dev
    sentence equal by content to an example of any seed of the setting (so it is the same whichever seeds run),
    then keeps a seeded subset of ``report_examples`` where set (the quick setting)."""
    from deltactl.tasks import get_task

    pool, keys = [], set()
    for example in get_task(TASK, data=data).train:
        key = pr.example_key(example)
        if key not in keys:  # a sentence twice in the train file would otherwise sit in two parts
            keys.add(key)
            pool.append(example)
    parts = {seed: seed_parts(pool, seed, cfg) for seed in cfg["seeds"]}
    for p in parts.values():
        pr.check_disjoint(p["train"] + p["manifold"], p["selection"])
        pr.check_disjoint(p["train"], p["manifold"])
    glue_dev = get_task(TASK, data=data, kshot_seed=REPORT_FOLDER_SEED).test
    used = [e for p in parts.values() for part in p.values() for e in part]
    seen = {pr.example_key(e) for e in used}
    clean = [e for e in glue_dev if pr.example_key(e) not in seen]
    report = subset(clean, cfg.get("report_examples"), seed=kshot.REPORT_SEED)
    pr.check_disjoint(used, report)
    return parts, report, len(glue_dev) - len(clean)


# ---------------------------------------------------------------------------------------------------- training

def run_spec(cfg: dict, seed: int, lr: float):
    from deltactl.train import run

    t = cfg["train"]
    return run.resolve(METHOD, TASK, {"lr": lr, "epochs": float(t["max_epochs"]), "batch_size": t["batch_size"],
                                      "eval_every": t["eval_every"], "patience": t["patience"], "seed": seed},
                       method_options=cfg.get("prefix_options"), max_length=t["max_length"], head=kshot.HEAD)


def train_key(cfg: dict, seed: int, lr: float, part: dict) -> dict:
    """Everything that defines one training run: a change to any of it is another run."""
    return {"task": TASK, "method": METHOD, "head": kshot.HEAD, "seed": seed, "lr": lr, "train": cfg["train"],
            "prefix_options": cfg.get("prefix_options"), "train_examples": digest(part["train"]),
            "selection_examples": digest(part["selection"])}


def run_folder(work: Path, seed: int, lr: float) -> Path:
    return work / "runs" / f"{TASK}-seed{seed}-lr{lr:g}"


def train(cfg, seed, lr, part, work, data) -> dict:
    """The cached run of (seed, lr) to its plateau on the selection split (``kshot.plateau``)."""
    from deltactl.train import run

    def prepare():
        spec = run_spec(cfg, seed, lr)
        _, task_model, _ = run.build(spec, data)
        return task_model.model, run.trainable_parameters(task_model), task_model, spec.train

    folder = run_folder(work, seed, lr)
    with kshot.folder_lock(folder):
        return kshot.plateau(train_key(cfg, seed, lr, part), folder, prepare, part["train"], part["selection"],
                             {"task": TASK, "seed": seed, "lr": lr, "method": METHOD})


def cached_training(cfg, seed, lr, part, work) -> dict | None:
    stored = run_folder(work, seed, lr) / "result.json"
    if stored.exists():
        record = json.loads(stored.read_text())
        if record.get("key") == train_key(cfg, seed, lr, part):
            return record
    return None


# ------------------------------------------------------------------------------------------------------ scoring

def batches(collate, examples, size):
    for start in range(0, len(examples), size):
        batch = collate(examples[start:start + size])
        labels = batch.pop("labels")
        yield batch, labels


def attacked(examples, kind, rate, seed):
    from deltactl.inference.attacks import perturb

    texts = perturb([e.text_a for e in examples], kind, rate, seed)
    return [replace(e, text_a=t) for e, t in zip(examples, texts)]


def score(task_model, robust, examples, size, trigger_of=None):
    """Accuracy without and with the robust prefix, and the seconds each took (triggers inserted per class)."""
    from deltactl.inference.attacks import insert_trigger

    correct = {"plain": 0, "robust": 0}
    seconds = {"plain": 0.0, "robust": 0.0}
    for batch, labels in batches(task_model.collate, examples, size):
        if trigger_of is not None:  # one trigger per true class, as in the paper: group the batch by class
            groups = [(labels == c) for c in trigger_of]
        else:
            groups = [torch.ones_like(labels, dtype=torch.bool)]
        for rows in groups:
            if not rows.any():
                continue
            sub = {k: v[rows] for k, v in batch.items()}
            if trigger_of is not None:
                sub = insert_trigger(sub, trigger_of[int(labels[rows][0])])
            start = time.perf_counter()
            with torch.no_grad():
                plain = task_model.model(**sub)
            seconds["plain"] += time.perf_counter() - start
            start = time.perf_counter()
            tuned = robust(**sub).outputs
            seconds["robust"] += time.perf_counter() - start
            correct["plain"] += (plain.argmax(-1) == labels[rows]).sum().item()
            correct["robust"] += (tuned.argmax(-1) == labels[rows]).sum().item()
    n = len(examples)
    return {k: correct[k] / n for k in correct}, {k: round(v, 2) for k, v in seconds.items()}


def evaluation_key(cfg: dict, seed: int, lr: float, part: dict, report: list) -> dict:
    return {"train": train_key(cfg, seed, lr, part), "manifold_examples": digest(part["manifold"]),
            "report": digest(report), "robust": cfg["robust"], "attacks": cfg["attacks"],
            "batch_size": cfg["batch_size"]}


def scored_key(cfg: dict, seed: int, lr: float, part: dict, report: list, work: Path) -> dict:
    """The evaluation's key and the hash of the δ it scores: a run retrained under the same key is scored anew."""
    return {**evaluation_key(cfg, seed, lr, part, report),
            "delta": kshot.file_digest(run_folder(work, seed, lr) / "best" / kshot.BEST)}


def evaluate(cfg, seed, lr, part, report, work, data, tokenizer) -> dict:
    """Build the manifolds and triggers from the manifold examples, score every condition on the report split with
    and without the robust prefix; cached beside the chosen run (``evaluation.json``)."""
    folder = run_folder(work, seed, lr)
    stored = folder / "evaluation.json"
    key = scored_key(cfg, seed, lr, part, report, work)
    if stored.exists() and json.loads(stored.read_text()).get("key") == key:
        return json.loads(stored.read_text())
    from deltactl.inference import RobustPrefix, fit_manifold
    from deltactl.inference.attacks import universal_trigger, word_vocabulary
    from deltactl.train import run

    started = time.perf_counter()
    task, task_model, delta = run.build(run_spec(cfg, seed, lr), data)
    params = dict(task_model.model.named_parameters())
    with torch.no_grad():
        for name, value in kshot.best_delta(folder).items():
            params[name].copy_(value)
    clf = task_model.model
    clf.eval()
    size = cfg["batch_size"]
    t0 = time.perf_counter()
    manifold = fit_manifold(delta, batches(task_model.collate, part["manifold"], size), clf)
    robust = RobustPrefix(delta, manifold, clf, **cfg["robust"])
    manifold_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    trig = cfg["attacks"]["trigger"]
    vocab = word_vocabulary(tokenizer)
    triggers = {}
    for c in range(len(task.labels)):  # searched on the plain prefix model, on manifold (training) examples
        of_class = [e for e in part["manifold"] if task.label_index(e) == c][: trig["examples"]]
        triggers[c] = universal_trigger(
            clf, delta.backbone.input_embeddings(), list(batches(task_model.collate, of_class, size)), target=1 - c,
            length=trig["length"], vocabulary=vocab, init_id=tokenizer.convert_tokens_to_ids("the"),
            iterations=trig["iterations"], candidates=trig["candidates"])
    trigger_seconds = time.perf_counter() - t0

    accuracy, seconds = {}, {}
    for condition in CONDITIONS:
        if condition == "clean":
            examples, trigger_of = report, None
        elif condition == "trigger":
            examples, trigger_of = report, triggers
        else:
            examples, trigger_of = attacked(report, condition, cfg["attacks"]["rate"], seed), None
        accuracy[condition], seconds[condition] = score(task_model, robust, examples, size, trigger_of)
        print(f"seed {seed} lr {lr:g} {condition:8s} plain {accuracy[condition]['plain']:.4f} "
              f"robust {accuracy[condition]['robust']:.4f}", flush=True)
    delta.detach()
    record = {"key": key, "accuracy": accuracy, "scoring_seconds": seconds,
              "triggers": {task.labels[c]: tokenizer.convert_ids_to_tokens(t.tolist()) for c, t in triggers.items()},
              "manifold": {"examples": manifold.examples, "seen": manifold.seen,
                           "ranks": [s.rank for s in manifold.layers]},
              "manifold_seconds": round(manifold_seconds, 2), "trigger_seconds": round(trigger_seconds, 2),
              "seconds": round(time.perf_counter() - started, 1)}
    kshot.write_json(stored, record)
    return record


# -------------------------------------------------------------------------------------------------------- seeds

def seed_row(seed: int, lr: float, scores: dict, records: dict, evaluation: dict) -> dict:
    chosen = records[lr]
    plain = sum(s["plain"] for s in evaluation["scoring_seconds"].values())
    tuned = sum(s["robust"] for s in evaluation["scoring_seconds"].values())
    return {"seed": seed, "lr": lr, "selection_scores": {f"{k:g}": v for k, v in scores.items()},
            "selection_accuracy": chosen["selection_accuracy"], "best_step": chosen["best_step"],
            "steps": chosen["steps"], "status": chosen["status"], "curve": chosen["curve"],
            "trainable_parameters": chosen["trainable_parameters"], "accuracy": evaluation["accuracy"],
            "triggers": evaluation["triggers"], "manifold": evaluation["manifold"],
            "scoring_seconds": evaluation["scoring_seconds"],
            "seconds": {"training": round(sum(r["seconds"] for r in records.values()), 1),
                        "evaluation": evaluation["seconds"], "manifold": evaluation["manifold_seconds"],
                        "trigger_search": evaluation["trigger_seconds"], "scoring_plain": round(plain, 2),
                        "scoring_robust": round(tuned, 2)},
            "robust_over_plain_time": round(tuned / plain, 2) if plain else None}


def one_seed(cfg, seed, part, report, work, data, tokenizer, train_it: bool) -> dict | None:
    """The seed's row: train both learning rates (or, with ``train_it`` false, read them if finished), choose on
    the selection split, evaluate the chosen prefix; None for an unfinished seed that is not to be trained."""
    grid = [float(lr) for lr in cfg["lr_grid"]]
    if train_it:
        records = {lr: train(cfg, seed, lr, part, work, data) for lr in grid}
    else:
        records = {lr: cached_training(cfg, seed, lr, part, work) for lr in grid}
        if any(r is None for r in records.values()):
            return None
    best, scores = kshot.choose_lr(grid, records, f"the prefix of seed {seed}")
    if not train_it:
        stored = run_folder(work, seed, best) / "evaluation.json"
        if not (stored.exists() and json.loads(stored.read_text()).get("key") ==
                scored_key(cfg, seed, best, part, report, work)):
            return None
    evaluation = evaluate(cfg, seed, best, part, report, work, data, tokenizer)
    return seed_row(seed, best, scores, records, evaluation)


# ------------------------------------------------------------------------------------------- table, verdicts

def per_seed(rows: list[dict], condition: str, kind: str) -> list[float]:
    return [r["accuracy"][condition][kind] for r in sorted(rows, key=lambda r: r["seed"])]


def table(rows: list[dict]) -> list[dict]:
    return [{"condition": condition, "kind": kind, "method": KINDS[kind],
             "summary": pr.summary(per_seed(rows, condition, kind)).to_dict()}
            for condition in CONDITIONS for kind in KINDS]


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for claim_id, claim, condition, rule in CLAIMS:
        difference = pr.paired_summary(per_seed(rows, condition, "robust"), per_seed(rows, condition, "plain"))
        out.append({"id": claim_id, "claim": claim, "condition": condition, "a": "robust", "b": "plain",
                    "rule": pr.rule_record(rule), "difference": difference.to_dict(),
                    "verdict": rule.verdict(difference)})
    return out


def measure(cfg: dict, args) -> dict:
    threads()
    from transformers import AutoTokenizer

    from deltactl.train.run import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    parts, report, dropped = splits(cfg, args.data)  # over every seed of the setting, whichever run now
    wanted = kshot.only_seeds(cfg, getattr(args, "seeds", None))["seeds"]
    work = work_dir("robust_prefix", args)
    rows = []
    for seed in cfg["seeds"]:
        row = one_seed(cfg, seed, parts[seed], report, work, args.data, tokenizer, train_it=seed in wanted)
        if row is not None:
            rows.append(row)
    if not rows:
        raise ValueError("no seed of the setting has finished yet; run without --seeds, or with one to train")
    seeds = [r["seed"] for r in rows]
    used = {s: parts[s] for s in seeds}
    plain = sum(r["seconds"]["scoring_plain"] for r in rows)
    tuned = sum(r["seconds"]["scoring_robust"] for r in rows)
    return {"seeds": seeds, "paper": PAPER, "task": TASK, "head": kshot.HEAD, "model": "all-MiniLM-L6-v2",
            "protocol": {"selection": pr.split_keys([e for p in used.values() for e in p["selection"]]),
                         "report": pr.split_keys(report),
                         "fitted": pr.split_keys([e for p in used.values() for e in p["train"] + p["manifold"]]),
                         "selection_split": "per seed, selection_examples further examples of the shuffled SST-2 "
                                            "train file (chooses the lr and the stopping step)",
                         "fitted_split": "per seed, the training and manifold examples (prefix training, manifolds, "
                                         "trigger search)",
                         "report_split": "the GLUE SST-2 dev set less sentences seen by any seed of the setting",
                         "report_size": len(report), "report_dropped_as_seen": dropped},
            "runs": rows, "table": table(rows), "verdicts": verdicts(rows),
            "robust_over_plain_time": round(tuned / plain, 2) if plain else None,
            # training of every lr of the grid, plus each chosen prefix's manifolds, trigger search and scoring
            "compute_seconds": round(sum(r["seconds"]["training"] + r["seconds"]["evaluation"] for r in rows), 1)}


# ------------------------------------------------------------------------------------------------------- plot

def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = payload["table"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.1, 1]})
    ax = axes[0]
    width = 0.38
    for k, (kind, label) in enumerate(KINDS.items()):
        cells = [next(r["summary"] for r in rows if (r["condition"], r["kind"]) == (c, kind)) for c in CONDITIONS]
        xs = [i + (k - 0.5) * width for i in range(len(CONDITIONS))]
        ax.bar(xs, [c["mean"] for c in cells], width, label=label, capsize=3,
               yerr=[[c["mean"] - c["low"] for c in cells], [c["high"] - c["mean"] for c in cells]])
    ax.set_xticks(range(len(CONDITIONS)), CONDITIONS)
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    ax.set_ylabel("report accuracy (GLUE SST-2 dev)", fontsize=8)
    ax.set_title("accuracy per condition: mean [95% CI] over seeds", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3, axis="y")
    plot_verdicts(axes[1], payload["verdicts"], "robust − plain accuracy (95% bootstrap CI over seeds)")
    axes[1].set_title("claims (rules in experiments/robust_prefix/README.md)", fontsize=9)
    save_figure(fig, path, f"robust prefix-tuning, all-MiniLM-L6-v2 ({payload.get('head')} head), SST-2, seeds "
                           f"{payload['seeds']}, {payload['mode']} setting")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
