"""Intrinsic prompt tuning (Qin et al., "Exploring universal intrinsic task subspace via prompt tuning").

On all-MiniLM-L6-v2 with the frozen label-word head of ``deltactl.train.models`` (nothing but the prompt, or z,
trains), for each k-shot seed:
  0. plain prompt tuning (p soft tokens) on every task, seen and unseen: the reference metric;
  1. an autoencoder ``PromptAutoencoder`` (Proj: ℝ^{p·h} → ℝ^{d_I}; Back: ℝ^{d_I} → hidden → ℝ^{p·h} through tanh)
     trained on the seen tasks' prompts with L = Σ_t ℓ_t(Back(Proj(P_t))) + α ‖P̂_t − P_t‖² / ‖P_t‖²
     (the relative error, so α does not depend on the embedding scale);
  2. ``IntrinsicPrompt``: only z ∈ ℝ^{d_I} (from 0) trains on each task, seen and unseen, Back frozen.
Reported: the metric of each, and the share of plain prompt tuning recovered, IPT / PT, per task and averaged
over seen and unseen tasks and seeds (also (IPT − zero-shot) / (PT − zero-shot), which does not credit what the
frozen head already knows).

    python experiments/ipt/run.py [--quick] [--out DIR] [--data DIR] [--plot-only]
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from deltactl.experiments import study

HERE = Path(__file__).resolve().parent


class Rows:
    """A callable model whose prompt rows are ``rows`` (applied with functional_call; the model is not written)."""

    def __init__(self, model, name, rows):
        self.model, self.name, self.rows = model, name, rows

    def __call__(self, **batch):
        return functional_call(self.model, {self.name: self.rows}, (), batch, strict=False)

    def parameters(self):
        return iter([self.rows])


def batches(examples, collate, size, seed):
    """An endless stream of shuffled batches (reshuffled every pass, seeded)."""
    rng = random.Random(seed)
    while True:
        order = list(examples)
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield collate(order[start : start + size])


def task_loss(model, batch):
    batch = dict(batch)
    labels = batch.pop("labels")
    return F.cross_entropy(model(**batch), labels)


def score(tm, model, dev, metric):
    with torch.no_grad():
        return tm.evaluate(model, dev, 64)[metric]


def setup(cfg, seed, data):
    from transformers import AutoModel, AutoTokenizer

    import deltactl as dc
    from deltactl.tasks import get_task
    from deltactl.train.models import classifier
    from deltactl.train.run import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    tasks = {}
    for name in cfg["seen"] + cfg["unseen"]:
        task = get_task(name, data=data, kshot_seed=seed)
        # the label embeddings are computed now, before any prompt is attached
        tm = classifier(task, encoder, tokenizer, cfg["max_length"], head="label_words")
        dev = random.Random(seed).sample(task.test, min(cfg["eval_examples"], len(task.test)))
        tasks[name] = (task, tm, dev)
    zero_shot = {n: score(tm, tm.model, dev, t.main_metric) for n, (t, tm, dev) in tasks.items()}
    delta = dc.attach(encoder, "prompt", length=cfg["prompt_length"], seed=seed)
    name = "bert." + next(f"deltactl.{delta.name}.{n}" for n, _ in delta.named_parameters())
    init = next(delta.parameters()).detach().clone()
    return tasks, zero_shot, name, init


def train(params, loss_of, steps, lr):
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = loss_of()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def run_seed(cfg, seed, data) -> dict:
    from deltactl.subspace import IntrinsicPrompt, PromptAutoencoder

    torch.manual_seed(seed)
    tasks, zero_shot, name, init = setup(cfg, seed, data)
    out = {"zero_shot": zero_shot, "pt": {}, "reconstructed": {}, "ipt": {}}
    prompts = {}
    for t_name, (task, tm, dev) in tasks.items():  # stage 0: plain prompt tuning
        rows = init.clone().requires_grad_(True)
        model = Rows(tm.model, name, rows)
        stream = batches(task.train, tm.collate, cfg["batch_size"], seed)
        train([rows], lambda: task_loss(model, next(stream)), cfg["pt_steps"], cfg["pt_lr"])  # noqa: B023
        prompts[t_name] = rows.detach()
        out["pt"][t_name] = score(tm, model, dev, task.main_metric)
        print(f"seed {seed} {t_name}: zero-shot {zero_shot[t_name]:.3f}, prompt tuning {out['pt'][t_name]:.3f}",
              flush=True)

    p, h = init.shape
    ae = PromptAutoencoder(p, h, cfg["intrinsic_dim"], cfg["hidden"])
    streams = {t: batches(tasks[t][0].train, tasks[t][1].collate, cfg["batch_size"], seed) for t in cfg["seen"]}

    def ae_loss():  # stage 1: task losses with the reconstructed prompts + α · relative reconstruction error
        total = 0.0
        for t in cfg["seen"]:
            recon = ae(prompts[t])
            total = total + task_loss(Rows(tasks[t][1].model, name, recon), next(streams[t]))
            total = total + cfg["alpha"] * (recon - prompts[t]).pow(2).sum() / prompts[t].pow(2).sum()
        return total / len(cfg["seen"])

    out["ae_final_loss"] = train(list(ae.parameters()), ae_loss, cfg["ae_steps"], cfg["ae_lr"])
    with torch.no_grad():
        for t in cfg["seen"]:
            task, tm, dev = tasks[t]
            out["reconstructed"][t] = score(tm, Rows(tm.model, name, ae(prompts[t])), dev, task.main_metric)

    for t_name, (task, tm, dev) in tasks.items():  # stage 2: only z trains, Back frozen
        ipt = IntrinsicPrompt(tm.model, name, ae)
        stream = batches(task.train, tm.collate, cfg["batch_size"], seed)
        train([ipt.z], lambda: task_loss(ipt, next(stream)), cfg["ipt_steps"], cfg["ipt_lr"])  # noqa: B023
        ipt.eval()
        out["ipt"][t_name] = score(tm, ipt, dev, task.main_metric)
        ipt.detach()
        print(f"seed {seed} {t_name}: IPT (d_I = {cfg['intrinsic_dim']}) {out['ipt'][t_name]:.3f}"
              + (f", reconstructed prompt {out['reconstructed'][t_name]:.3f}" if t_name in cfg["seen"] else ""),
              flush=True)
    return out


def summarise(cfg, seeds: dict) -> dict:
    """Mean shares recovered over tasks and seeds, seen and unseen."""
    summary = {}
    for group in ("seen", "unseen"):
        ratios, lifts, recon = [], [], []
        for res in seeds.values():
            for t in cfg[group]:
                pt, ipt, zs = res["pt"][t], res["ipt"][t], res["zero_shot"][t]
                ratios.append(ipt / pt if pt else float("nan"))
                if abs(pt - zs) > 1e-9:
                    lifts.append((ipt - zs) / (pt - zs))
                if t in res["reconstructed"]:
                    recon.append(res["reconstructed"][t] / pt if pt else float("nan"))
        summary[group] = {
            "ipt_over_pt_mean": statistics.fmean(ratios), "ipt_over_pt_all": ratios,
            "lift_recovered_mean": statistics.fmean(lifts) if lifts else None,
            "reconstructed_over_pt_mean": statistics.fmean(recon) if recon else None,
        }
    return summary


def plot(results, path):
    """Bars per task: zero-shot, prompt tuning, IPT (mean over seeds, min–max as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, seeds = results["config"], results["seeds"]
    names = cfg["seen"] + cfg["unseen"]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 3.8))
    for k, (key, label) in enumerate([("zero_shot", "zero-shot"), ("pt", "prompt tuning"),
                                      ("ipt", f"IPT (z ∈ ℝ^{cfg['intrinsic_dim']})")]):
        values = [[s[key][t] for s in seeds.values()] for t in names]
        means = [statistics.fmean(v) for v in values]
        err = [[m - min(v) for m, v in zip(means, values)], [max(v) - m for m, v in zip(means, values)]]
        ax.bar([i + 0.27 * (k - 1) for i in range(len(names))], means, 0.27, yerr=err, label=label, capsize=2)
    ax.set_xticks(range(len(names)), [t + ("*" if t in cfg["unseen"] else "") for t in names])
    s = results["summary"]
    ax.set_title(f"IPT recovers {s['seen']['ipt_over_pt_mean']:.0%} (seen) / {s['unseen']['ipt_over_pt_mean']:.0%} "
                 f"(unseen*) of prompt tuning", fontsize=10)
    ax.set_ylabel("test metric (sample)")
    ax.legend(fontsize=8)
    study.save_figure(fig, path)


def merge(path: Path, mode: str, cfg: dict, seed: int, result: dict) -> dict:
    """Add one seed's result to results.json (kept only if it holds the same mode and config) and re-summarise."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if results.get("mode") != mode or results.get("config") != cfg:
        results = {"mode": mode, "config": cfg, "threads": torch.get_num_threads(), "seeds": {}}
    results["seeds"][str(seed)] = result
    results["summary"] = summarise(cfg, results["seeds"])
    results["seconds"] = sum(r["seconds"] for r in results["seeds"].values())  # CPU-parallel runs: summed
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None):
    parser = study.parser(__doc__.split("\n")[0])  # the flags every study shares
    parser.add_argument("--seeds", help="comma-separated subset of the config's k-shot seeds (runs can then go in "
                        "parallel; each adds its seeds to an existing results.json of the same mode)")
    args = parser.parse_args(argv)
    started = study.begin(HERE, args, plot)
    if started is None:  # --plot-only: the figure is redrawn
        return
    mode, out, cfg = started
    chosen = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["kshot_seeds"]
    if any(s not in cfg["kshot_seeds"] for s in chosen):
        raise SystemExit(f"--seeds must be among this mode's seeds {cfg['kshot_seeds']}, got {chosen}")
    start = time.perf_counter()
    for seed in chosen:
        result = run_seed(cfg, seed, args.data)
        result["seconds"] = time.perf_counter() - start
        results = merge(out / "results.json", mode, cfg, seed, result)
    plot(results, out / "figure.png")
    s = results["summary"]
    print(f"IPT / PT: seen {s['seen']['ipt_over_pt_mean']:.3f}, unseen {s['unseen']['ipt_over_pt_mean']:.3f}; "
          f"wrote {out} in {results['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
