"""Training-step time and peak memory of every deltactl method on one T5 shape, relative to deltactl's LoRA,
and relative to PEFT where PEFT has the method (IA3, prefix-tuning, prompt-tuning).

Each side is one delta on the same frozen weights (float32, train mode, no dropout); a step is forward with
labels, backward, ``AdamW.step()``, ``zero_grad()``. Timing runs ``--rounds`` rounds in which every side runs
``--steps`` steps, in an order that reverses from round to round; a side's time is its median over rounds, and
each ratio is the median over rounds of the ratio within a round (slow drifts in load cancel). Peak memory is
measured per side in a fresh subprocess, as in ``lora_vs_peft.py`` (peak resident set during the steps minus
the resident set before them, after a warm-up step; CUDA: ``max_memory_allocated`` after
``reset_peak_memory_stats``, minus the memory allocated before the steps).

``--device cuda`` (the default where there is a GPU) synchronises the device around every timed region; ``--bf16``
runs the forward passes under bf16 autocast over the float32 weights, on every side alike.

PEFT's prefix-tuning on T5 acts in decoder self-attention only, so it is compared with deltactl's prefix on the
same sites (``prefix@decoder``); deltactl's default prefix also acts in the encoder and cross-attention.

Usage::

    python benchmarks/methods_step.py                        # t5-small, batch 8, 128 → 32 tokens
    python benchmarks/methods_step.py --shape t5-tiny --rounds 3 --json out.json
    python benchmarks/methods_step.py --device cuda --bf16 --shape t5-base --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import deltactl as dc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_vs_peft import (  # noqa: E402 - the shared measuring code of the LoRA benchmark
    _hwm_bytes,
    _reset_hwm,
    _rss_bytes,
    build_base,
    make_batch,
    time_steps,
    train_step,
)
from timing import MIB, add_device_arguments, cuda_peak, is_cuda  # noqa: E402

# side name -> (method, options); each runs as deltactl.attach(model, method, **options)
DELTACTL = {
    "lora": ("lora", {}),
    "adapter": ("adapter", {}),
    "pfeiffer": ("pfeiffer", {}),
    "parallel_adapter": ("parallel_adapter", {}),
    "lowrank_adapter": ("lowrank_adapter", {}),
    "compacter": ("compacter", {}),
    "bitfit": ("bitfit", {}),
    "ia3": ("ia3", {}),
    "ln_tuning": ("ln_tuning", {}),
    "prefix": ("prefix", {"length": 20}),
    "prefix@decoder": ("prefix", {"length": 20, "reparameterize": False, "sites": ("decoder.*.attn.kv",)}),
    "prompt": ("prompt", {"length": 20}),
    "last_layer": ("last_layer", {}),
    "selective": ("selective", {"budget": 0.05}),
    "mask": ("mask", {}),
    "diff_pruning": ("diff_pruning", {}),
}
# PEFT's counterpart of a deltactl side
PEFT = {"ia3": "peft:ia3", "prefix@decoder": "peft:prefix", "prompt": "peft:prompt"}


def peft_config(side: str, model):
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    cfg = model.config
    if side == "peft:ia3":
        return IA3Config(task_type="SEQ_2_SEQ_LM", target_modules=["k", "v", "wo"], feedforward_modules=["wo"])
    if side == "peft:prefix":
        return PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=20, token_dim=cfg.num_heads * cfg.d_kv,
                                  num_layers=cfg.num_decoder_layers)
    return PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=20)


def make(side: str, base):
    """The model to call for a side, built on ``base`` itself (callers pass a copy when they need one)."""
    if side.startswith("peft:"):
        from peft import get_peft_model

        return get_peft_model(base, peft_config(side, base))
    method, options = DELTACTL[side]
    dc.attach(base, method, **options)
    return base


def optimizer_for(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def side_run(side: str, args):
    """(model, batch, optimizer) of one side on ``args.device``."""
    model = make(side, build_base(args.shape, args.seed, args.device))
    batch = make_batch(model.config.vocab_size, args.batch, args.source_len, args.target_len, args.seed + 1,
                       args.device)
    return model, batch, optimizer_for(model)


def time_all(sides, args) -> dict:
    runs = {}
    for side in sides:
        runs[side] = side_run(side, args)
        for _ in range(args.warmup):
            train_step(*runs[side], args.bf16)
    per_round = {side: [] for side in sides}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            per_round[side].append(time_steps(*runs[side], args.steps, args.device, args.bf16))
    load.append(os.getloadavg()[0])
    return {"per_round": per_round, "load_average_1min": load}


def paired(per_round, a, b) -> float:
    return statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))


def memory_worker(side: str, args) -> dict:
    model, batch, optimizer = side_run(side, args)
    train_step(model, batch, optimizer, args.bf16)  # allocates the AdamW state before the measured steps
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if is_cuda(args.device):
        with cuda_peak(args.device, {}) as peak:
            for _ in range(args.memory_steps):
                train_step(model, batch, optimizer, args.bf16)
        return {"peak_bytes": peak["extra_bytes"], "trainable": trainable}
    before = _rss_bytes()
    if not _reset_hwm():
        raise RuntimeError("this benchmark measures memory through /proc/self/clear_refs (Linux)")
    for _ in range(args.memory_steps):
        train_step(model, batch, optimizer, args.bf16)
    return {"peak_bytes": _hwm_bytes() - before, "trainable": trainable}


def worker_command(side: str, args) -> list[str]:
    """The command line of the memory subprocess of one side."""
    return [sys.executable, os.path.abspath(__file__), "--memory-worker", side, "--shape", args.shape,
            "--batch", str(args.batch), "--source-len", str(args.source_len), "--target-len", str(args.target_len),
            "--memory-steps", str(args.memory_steps), "--seed", str(args.seed), "--threads", str(args.threads),
            "--device", args.device] + (["--bf16"] if args.bf16 else [])


def memory(side: str, args) -> dict:
    cmd = worker_command(side, args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {side} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "—"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="t5-small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--source-len", type=int, default=128)
    ap.add_argument("--target-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--sides", nargs="*", help="only these deltactl sides (default: all)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    add_device_arguments(ap, bf16="bf16 autocast over the float32 weights in every step")
    ap.add_argument("--memory-worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args)))
        return 0
    ours = args.sides or list(DELTACTL)
    unknown = [s for s in ours if s not in DELTACTL]
    if unknown:
        raise SystemExit(f"unknown side {unknown[0]!r}; sides are {', '.join(DELTACTL)}")
    if "lora" not in ours:
        ours = ["lora", *ours]
    sides = ours + [PEFT[s] for s in ours if s in PEFT]
    timing = time_all(sides, args)
    per_round = timing["per_round"]
    mem = {} if args.no_memory else {side: memory(side, args) for side in sides}
    where = args.device if is_cuda(args.device) else f"{args.threads} threads"
    precision = "bf16 autocast" if args.bf16 else "float32"
    print(f"{args.shape}, batch {args.batch}, {args.source_len}→{args.target_len} tokens, {where}, {precision}, "
          f"{args.rounds} rounds × {args.steps} steps; load average {timing['load_average_1min']}")
    print(f"{'side':<18}{'trainable':>12}{'ms/step':>10}{'vs LoRA':>9}{'vs PEFT':>9}{'peak MiB':>10}{'mem/LoRA':>10}"
          f"{'mem/PEFT':>10}")
    rows = {}
    for side in sides:
        ms = 1000 * statistics.median(per_round[side])
        row = {"ms_per_step": ms, "time_vs_lora": paired(per_round, side, "lora")}
        peer = PEFT.get(side)
        if peer:
            row["time_vs_peft"] = paired(per_round, side, peer)
        if mem:
            row["peak_mib"] = mem[side]["peak_bytes"] / MIB
            row["trainable"] = mem[side]["trainable"]
            row["memory_vs_lora"] = mem[side]["peak_bytes"] / mem["lora"]["peak_bytes"]
            if peer:
                row["memory_vs_peft"] = mem[side]["peak_bytes"] / mem[peer]["peak_bytes"]
        rows[side] = row

        print(f"{side:<18}{cell(row, 'trainable', ','):>12}{ms:>10.1f}{row['time_vs_lora']:>9.3f}"
              f"{cell(row, 'time_vs_peft', '.3f'):>9}{cell(row, 'peak_mib', '.1f'):>10}"
              f"{cell(row, 'memory_vs_lora', '.3f'):>10}"
              f"{cell(row, 'memory_vs_peft', '.3f'):>10}")
    if not is_cuda(args.device) and max(timing["load_average_1min"]) > (os.cpu_count() or 1) + 0.75:
        print("warning: the load average exceeded the core count: other processes competed, timings are noisy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows, "timing": timing}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
