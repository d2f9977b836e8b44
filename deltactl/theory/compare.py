"""Two studies built on the theory tools: controllability at an equal budget, and MSA against Adam on SST-2."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import deltactl as dc
from deltactl.methods import make_config
from deltactl.theory import fixtures as fx
from deltactl.theory.model import model_system, trainable_controls
from deltactl.theory.msa import MSA, MSAConfig
from deltactl.theory.reachability import output_map, spectrum

# 192 δ parameters each on the tiny T5 (d_model 16, 2 heads × 4, 2 + 2 blocks; 196 for the adapter).
EQUAL_BUDGET = {
    "lora": make_config("lora", r=1, sites=("*.attn.q", "*.attn.v")),            # 8 sites × r(16 + 8)
    "adapter": make_config("adapter", r=1, sites=("*.ffn.out",)),                # 4 sites × (2·16·r + 16 + r)
    "prefix": make_config("prefix", length=2, reparameterize=False),             # 6 memories × 2 rows × 2·8
    "prompt": make_config("prompt", length=12),                                  # 12 rows × 16
    "bitfit": make_config("bitfit", sites=("*.o", "*.wo", "*.final_ln")),       # 12 outputs × 16
}


def controllability_at_equal_budget(out=None, seed: int = 0) -> list[dict]:
    """Full singular spectrum of ∂logits/∂δ (tiny T5, float64, random δ) for each method at ≈ 192 parameters."""
    rows = []
    batch = fx.t5_batch()
    for name, config in EQUAL_BUDGET.items():
        model = fx.tiny_t5(seed)
        delta = dc.attach(model, config)
        fx.perturb(delta.parameters(), seed=seed, scale=0.3)
        logits = output_map(model, batch, lambda m, b: m(**b).logits)
        spec = spectrum(logits, trainable_controls(model))
        rows.append({"method": name, "params": delta.num_parameters(), "rank": spec.rank, "outputs": spec.shape[0],
                     "values": spec.values.tolist()})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "theory_reach.json").write_text(json.dumps(rows, indent=1) + "\n")
        _plot_spectra(rows, out / "theory_reach.png")
    return rows


def _plot_spectra(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        values = torch.tensor(r["values"])
        ax.semilogy(range(1, len(values) + 1), (values / values[0]).clamp_min(1e-18),
                    label=f"{r['method']} ({r['params']} params, rank {r['rank']})")
    ax.axhline(1e-6, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("index i")
    ax.set_ylabel("σᵢ / σ₁ of ∂logits/∂δ")
    ax.set_title("Local controllability at an equal budget (tiny T5)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- MSA against Adam -----------------------------------------------------------------------------------------

SETTINGS = {  # SST-2 subsample, all-MiniLM-L6-v2 + LoRA (r = 8 on q, v) + linear head, eval mode (no dropout)
    "full": {"train": 768, "dev": 300, "epochs": 2, "batch": 32, "eval_every": 6, "max_length": 64},
    "quick": {"train": 128, "dev": 64, "epochs": 1, "batch": 32, "eval_every": 2, "max_length": 48},
}
OPTIMISERS = {
    "adam": {"lr": 2e-3},
    "msa": {"lr": 2e-3, "inner_steps": 2, "rho": 0.0, "proximal": 0.0, "optimizer": "adam"},
}


def msa_vs_adam(out, quick: bool = False, data=None, plot_only: bool = False) -> dict:
    """Train the same LoRA δ (and head) with Adam and with MSA from the same start; log loss and dev accuracy."""
    out = Path(out)
    path = out / "theory_msa_vs_adam.json"
    if plot_only:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: run without --plot-only first")
        summary = json.loads(path.read_text())
    else:
        settings = SETTINGS["quick" if quick else "full"]
        summary = {"settings": settings, "optimisers": OPTIMISERS, "threads": 1, "runs": {}}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # measured: on 2 shared cores one thread is several times faster than two
        try:
            for name in OPTIMISERS:
                summary["runs"][name] = _train(name, settings, data)
        finally:
            torch.set_num_threads(threads)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1) + "\n")
    _plot_curves(summary, out / "theory_msa_vs_adam.png")
    return summary


def _train(name: str, settings: dict, data) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from deltactl.tasks import get_task
    from deltactl.train.models import classifier
    from deltactl.train.run import default_model_path

    task = get_task("sst2", data=data)
    g = torch.Generator().manual_seed(0)
    train = [task.train[i] for i in torch.randperm(len(task.train), generator=g)[: settings["train"]].tolist()]
    dev = task.dev[: settings["dev"]]
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)  # same head and δ initialisation for both optimisers
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    task_model = classifier(task, encoder, tokenizer, settings["max_length"])
    dc.attach(encoder, "lora", r=8, sites=("*.q", "*.v"))
    model = task_model.model.eval()  # eval mode: the stages are re-run, so no dropout
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if name == "adam":
        optimiser = torch.optim.Adam(params.values(), lr=OPTIMISERS["adam"]["lr"])
    else:
        optimiser = MSA(params, MSAConfig(**OPTIMISERS["msa"]))
    log = {"step": [], "train_loss": [], "eval_step": [], "accuracy": [], "seconds": 0.0}
    start, step = time.perf_counter(), 0
    for epoch in range(settings["epochs"]):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch)).tolist()
        for i in range(0, len(order), settings["batch"]):
            batch = task_model.collate([train[j] for j in order[i: i + settings["batch"]]])
            if name == "adam":
                optimiser.zero_grad()
                loss = task_model.loss(model, batch)
                loss.backward()
                optimiser.step()
                value = loss.item()
            else:
                value = optimiser.step(model_system(model, batch, task_model.loss))["objective"]
            step += 1
            log["step"].append(step)
            log["train_loss"].append(value)
            if step % settings["eval_every"] == 0:
                with torch.no_grad():
                    accuracy = task_model.evaluate(model, dev, 64)["accuracy"]
                log["eval_step"].append(step)
                log["accuracy"].append(accuracy)
    log["seconds"] = time.perf_counter() - start
    return log


def _plot_curves(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    for name, run in summary["runs"].items():
        a.plot(run["step"], run["train_loss"], label=f"{name} ({run['seconds']:.0f} s)")
        b.plot(run["eval_step"], run["accuracy"], marker="o", ms=3, label=name)
    a.set_xlabel("step")
    a.set_ylabel("training loss (batch)")
    b.set_xlabel("step")
    b.set_ylabel("dev accuracy")
    s = summary["settings"]
    fig.suptitle(f"MiniLM + LoRA on SST-2 ({s['train']} train / {s['dev']} dev examples): MSA vs Adam", fontsize=9)
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
