"""Training-step cost of deltactl's LoRA against PEFT's LoRA on the same T5 weights.

Both sides put LoRA with r=8, alpha=16 and no dropout on the ``q`` and ``v`` projections of every
attention (encoder self, decoder self, decoder cross): deltactl through ``deltactl.attach`` (forward
hooks on the frozen linears), PEFT through ``get_peft_model`` (wrapper modules around them).

How it is measured, per T5 shape:

1. One model is built with a fixed seed (``dropout_rate=0``, float32, train mode) and deep-copied for
   each side, so both start from the same frozen weights.
2. Parity: deltactl's ``B`` matrices are randomised (so the update is not zero), every ``A``/``B`` is
   copied into PEFT's ``lora_A``/``lora_B``, and the loss, logits and LoRA gradients of one batch are
   compared. The loss of the bare model is printed too, to show the update changes the output.
3. Step time: a step is forward with labels, backward, ``AdamW.step()`` on the trainable parameters,
   ``zero_grad()``. After a few warm-up steps per side, ``--rounds`` rounds each time ``--steps``
   steps of one side and then the other, the order alternating from round to round; a side's time is
   the median over rounds of its mean step time in the round. The table also gives the median over
   rounds of the ratio deltactl/PEFT within a round, which slow drifts in machine load cancel out of,
   and a warning when the load average shows other processes competing for the CPU.
4. Peak memory: each side runs alone in a fresh subprocess that builds the same model, attaches its
   LoRA (to the model itself, no copy) and runs one warm-up step (which allocates the AdamW state and
   loads anything loaded lazily).
   On CPU, torch keeps no peak-allocation counter, so the subprocess resets the kernel's resident-set
   high-water mark (``/proc/self/clear_refs``), runs the measured steps and reports
   peak RSS - RSS before those steps, i.e. the peak extra memory of a step (activations kept for
   backward, gradients, temporaries). glibc is told to serve every allocation above 64 KiB with mmap
   (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set rather than being kept in
   the heap (without it the retained heap hides most of a step's memory, unequally between runs).
   Where the high-water mark cannot be reset (not Linux), the fallback is ``ru_maxrss`` over a
   baseline taken right after the model is built, before any step; it also counts the AdamW state,
   and it undercounts when building the model peaked higher than the memory the model then holds.
   On CUDA the same window is measured with ``torch.cuda.max_memory_allocated`` after
   ``reset_peak_memory_stats``, minus the memory allocated before the steps.

``--device cuda`` (the default where there is a GPU) synchronises the device around every timed region;
``--bf16`` runs the forward passes of the timed and measured steps under bf16 autocast (the weights stay float32;
the parity check always runs in float32).

Usage::

    python benchmarks/lora_vs_peft.py                      # t5-tiny and t5-small (plus t5-base on CUDA)
    python benchmarks/lora_vs_peft.py --shapes t5-base --steps 2 --json results.json
    python benchmarks/lora_vs_peft.py --device cuda --bf16 --shapes t5-base
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys

import torch
from transformers import T5ForConditionalGeneration

import deltactl as dc
from deltactl.shapes import t5_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import add_device_arguments, autocast, cuda_peak, device_name, is_cuda, mib, seconds  # noqa: E402

RANK, ALPHA, TARGETS = 8, 16.0, ("q", "v")
SIDES = ("deltactl", "peft")
# (batch, source length, target length) per shape when not given on the command line
DEFAULT_SIZES = {"t5-tiny": (4, 32, 8), "t5-small": (8, 128, 32)}
FALLBACK_SIZE = (8, 128, 32)


# ---- models and batches --------------------------------------------------------------------------


def build_base(shape: str, seed: int, device: str) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(t5_config(shape, dropout_rate=0.0))
    return model.to(device=device, dtype=torch.float32).train()


def attach_deltactl(model):
    delta = dc.attach(model, "lora", r=RANK, alpha=ALPHA, dropout=0.0, sites=tuple(f"*.{t}" for t in TARGETS))
    return model, delta


def attach_peft(model):
    from peft import LoraConfig, get_peft_model  # imported here: the deltactl memory worker need not load it

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS),
                        task_type="SEQ_2_SEQ_LM")
    return get_peft_model(model, config)


def make_side(side: str, base, copy_base: bool = True):
    """(model to call, handle): the deltactl Delta or the PEFT model as handle; ``base`` is copied first."""
    model = copy.deepcopy(base) if copy_base else base
    if side == "deltactl":
        model, delta = attach_deltactl(model)
        return model, delta
    peft_model = attach_peft(model)
    return peft_model, peft_model


def make_batch(vocab: int, batch: int, src: int, tgt: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, src), generator=g)
    labels = torch.randint(2, vocab, (batch, tgt), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    mask[-1, src // 2:] = 0  # one padded row, so the mask matters
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model):
    return torch.optim.AdamW(trainable(model), lr=1e-4)


def train_step(model, batch, optimizer, bf16: bool = False):
    """Forward with labels (under bf16 autocast with ``bf16``), backward, AdamW step, zero_grad."""
    with autocast(batch["input_ids"].device, bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


# ---- parity -------------------------------------------------------------------------------------


def lora_pairs(delta, peft_model):
    """(deltactl A, deltactl B, PEFT lora_A weight, PEFT lora_B weight) for every site."""
    inner = peft_model.base_model.model
    for site in delta.controller.sites:
        layer = delta.controller.layers[site.name.replace(".", "__")]
        target = inner.get_submodule(site.module)
        yield layer.A, layer.B, target.lora_A["default"].weight, target.lora_B["default"].weight


def copy_lora_weights(delta, peft_model, seed: int) -> int:
    """Randomise deltactl's B, then copy A and B into PEFT; returns the number of sites."""
    g = torch.Generator().manual_seed(seed)
    pairs = list(lora_pairs(delta, peft_model))
    with torch.no_grad():
        for a, b, pa, pb in pairs:
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)
            pa.copy_(a)
            pb.copy_(b)
    return len(pairs)


def check_parity(base, dc_model, delta, peft_model, batch, seed: int) -> dict:
    sites = copy_lora_weights(delta, peft_model, seed)
    out_dc, out_peft = dc_model(**batch), peft_model(**batch)
    with torch.no_grad():
        base_loss = base(**batch).loss.item()
    out_dc.loss.backward()
    out_peft.loss.backward()
    grad_diff = max(
        max((a.grad - pa.grad).abs().max().item(), (b.grad - pb.grad).abs().max().item())
        for a, b, pa, pb in lora_pairs(delta, peft_model)
    )
    for model in (dc_model, peft_model):
        model.zero_grad(set_to_none=True)
    return {
        "sites": sites,
        "loss_deltactl": out_dc.loss.item(),
        "loss_peft": out_peft.loss.item(),
        "loss_bare_model": base_loss,
        "max_abs_diff_loss": abs(out_dc.loss.item() - out_peft.loss.item()),
        "max_abs_diff_logits": (out_dc.logits - out_peft.logits).abs().max().item(),
        "max_abs_diff_lora_grads": grad_diff,
    }


# ---- timing -------------------------------------------------------------------------------------


def time_steps(model, batch, optimizer, steps: int, device: str, bf16: bool = False) -> float:
    """Mean seconds per training step over ``steps`` steps (the device synchronised around them)."""
    def run():
        for _ in range(steps):
            train_step(model, batch, optimizer, bf16)

    return seconds(run, device) / steps


def time_sides(runs: dict, batch, warmup: int, steps: int, rounds: int, device: str, bf16: bool = False) -> dict:
    """Per-step seconds of each side per round, the sides alternating order from round to round.

    Returns each side's median over rounds, and the median over rounds of the ratio deltactl/PEFT
    within a round (both sides of a round ran back to back, so slow drifts in machine load cancel).
    """
    for model, optimizer in runs.values():
        for _ in range(warmup):
            train_step(model, batch, optimizer, bf16)
    per_round = {side: [] for side in runs}
    order = list(runs)
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    for r in range(rounds):
        for side in order if r % 2 == 0 else order[::-1]:
            model, optimizer = runs[side]
            per_round[side].append(time_steps(model, batch, optimizer, steps, device, bf16))
    if load:
        load.append(os.getloadavg()[0])
    out = {side: {"median_s": statistics.median(ts), "rounds_s": ts} for side, ts in per_round.items()}
    out["paired_ratio"] = statistics.median(a / b for a, b in zip(per_round["deltactl"], per_round["peft"]))
    out["load_average_1min"] = load
    return out


def contention_note(timing: dict, threads: int, device: str) -> str | None:
    """A warning when other processes probably competed for the CPU during the timing."""
    if is_cuda(device) or not timing["load_average_1min"]:
        return None
    others = max(timing["load_average_1min"]) - threads  # this process keeps about `threads` cores busy
    if others > max(0.75, (os.cpu_count() or 1) - threads):
        return (f"warning: 1-min load average reached {max(timing['load_average_1min']):.2f} with {threads} torch "
                f"threads on {os.cpu_count()} cores: other processes competed for the CPU, timings are noisy")
    return None


# ---- peak memory (run in a fresh subprocess per side) ---------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory(side: str, shape: str, size, steps: int, seed: int, device: str, bf16: bool = False) -> dict:
    """Peak extra memory (bytes) of ``steps`` training steps of one side, in this (fresh) process."""
    model, _ = make_side(side, build_base(shape, seed, device), copy_base=False)  # no copy: no transient peak
    batch = make_batch(model.config.vocab_size, *size, seed=seed + 1, device=device)
    optimizer = make_optimizer(model)
    if is_cuda(device):
        train_step(model, batch, optimizer, bf16)
        with cuda_peak(device, {}) as peak:
            for _ in range(steps):
                train_step(model, batch, optimizer, bf16)
        return {"method": "cuda max_memory_allocated", "peak_bytes": peak["extra_bytes"]}
    gc.collect()
    if sys.platform.startswith("linux") and _reset_hwm():
        train_step(model, batch, optimizer, bf16)
        gc.collect()
        before = _rss_bytes()
        _reset_hwm()
        for _ in range(steps):
            train_step(model, batch, optimizer, bf16)
        return {"method": "VmHWM reset after warm-up step", "peak_bytes": _hwm_bytes() - before}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    for _ in range(steps + 1):
        train_step(model, batch, optimizer, bf16)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"method": "ru_maxrss over post-build baseline", "peak_bytes": after - before}


def worker_command(side: str, shape: str, size, args) -> list[str]:
    """The command line of the memory subprocess of one side."""
    return [sys.executable, os.path.abspath(__file__), "--memory-worker", side, "--shapes", shape,
            "--batch", str(size[0]), "--source-len", str(size[1]), "--target-len", str(size[2]),
            "--memory-steps", str(args.memory_steps), "--seed", str(args.seed), "--threads", str(args.threads),
            "--device", args.device] + (["--bf16"] if args.bf16 else [])


def memory_in_subprocess(side: str, shape: str, size, args) -> dict:
    if args.no_memory:
        return {"method": "not measured (--no-memory)", "peak_bytes": None}
    cmd = worker_command(side, shape, size, args)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {side} on {shape} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- one shape ------------------------------------------------------------------------------------


def sizes_for(shape: str, args) -> tuple[int, int, int]:
    default = DEFAULT_SIZES.get(shape, FALLBACK_SIZE)
    given = (args.batch, args.source_len, args.target_len)
    return tuple(g if g is not None else d for g, d in zip(given, default))


def steps_for(shape: str, args) -> int:
    if args.steps is not None:
        return args.steps
    return 20 if shape == "t5-tiny" or is_cuda(args.device) else 2


def bench_shape(shape: str, args) -> dict:
    size, steps = sizes_for(shape, args), steps_for(shape, args)
    base = build_base(shape, args.seed, args.device)
    dc_model, delta = make_side("deltactl", base)
    peft_model, _ = make_side("peft", base)
    batch = make_batch(base.config.vocab_size, *size, seed=args.seed + 1, device=args.device)

    parity = check_parity(base, dc_model, delta, peft_model, batch, args.seed + 2)
    counts = {"deltactl": sum(p.numel() for p in trainable(dc_model)),
              "peft": sum(p.numel() for p in trainable(peft_model))}
    del base
    runs = {"deltactl": (dc_model, make_optimizer(dc_model)), "peft": (peft_model, make_optimizer(peft_model))}
    timing = time_sides(runs, batch, args.warmup, steps, args.rounds, args.device, args.bf16)
    del runs, dc_model, peft_model, delta
    gc.collect()
    memory = {side: memory_in_subprocess(side, shape, size, args) for side in SIDES}
    return {"shape": shape, "batch": size[0], "source_len": size[1], "target_len": size[2], "steps": steps,
            "rounds": args.rounds, "warmup": args.warmup, "memory_steps": args.memory_steps,
            "trainable_params": counts, "parity": parity, "step_time": timing, "peak_memory": memory}


# ---- report ---------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "—"
    return f"{a / b:.3f}" if b else "n/a"


def print_shape(result: dict, args) -> None:
    p, t, m, n = result["parity"], result["step_time"], result["peak_memory"], result["trainable_params"]
    print(f"\n== {result['shape']}  batch {result['batch']}, source {result['source_len']}, "
          f"target {result['target_len']}  ({p['sites']} LoRA sites, r={RANK}, alpha={ALPHA:g})")
    print(f"parity (B randomised, weights copied into PEFT): loss deltactl {p['loss_deltactl']:.6f}, "
          f"PEFT {p['loss_peft']:.6f}, bare model {p['loss_bare_model']:.6f}")
    print(f"  max |diff|: loss {p['max_abs_diff_loss']:.2e}, logits {p['max_abs_diff_logits']:.2e}, "
          f"LoRA grads {p['max_abs_diff_lora_grads']:.2e}")
    ms = {s: t[s]["median_s"] * 1e3 for s in SIDES}
    peak = {s: m[s]["peak_bytes"] for s in SIDES}
    spread = {s: f"{min(t[s]['rounds_s']) * 1e3:.1f}-{max(t[s]['rounds_s']) * 1e3:.1f}" for s in SIDES}
    same = "equal" if n["deltactl"] == n["peft"] else "DIFFER"
    rows = [
        ("step time, median (ms)", f"{ms['deltactl']:.2f}", f"{ms['peft']:.2f}", ratio(ms["deltactl"], ms["peft"])),
        ("  range over rounds (ms)", spread["deltactl"], spread["peft"], ""),
        ("  ratio within a round", "", "", f"{t['paired_ratio']:.3f}"),
        ("peak extra memory (MiB)", mib(peak["deltactl"]), mib(peak["peft"]), ratio(peak["deltactl"], peak["peft"])),
        ("trainable parameters", f"{n['deltactl']:,}", f"{n['peft']:,}", same),
    ]
    print(f"{'':26}{'deltactl':>14}{'PEFT':>14}{'deltactl/PEFT':>16}")
    for label, a, b, r in rows:
        print(f"{label:26}{a:>14}{b:>14}{r:>16}")
    print(f"  time: {result['rounds']} rounds x {result['steps']} steps per side after {result['warmup']} warm-up "
          f"steps, sides alternating; ratio within a round: median over rounds")
    print(f"  memory: peak extra memory of {result['memory_steps']} steps over the memory before them, "
          f"{m['deltactl']['method']}, one fresh process per side")
    note = contention_note(t, args.threads, args.device)
    if note:
        print("  " + note)


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=None,
                    help="T5 shapes (default: t5-tiny t5-small, plus t5-base on CUDA)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default per shape)")
    ap.add_argument("--source-len", type=int, default=None, help="encoder length (default per shape)")
    ap.add_argument("--target-len", type=int, default=None, help="label length (default per shape)")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per side per round (default 20 for t5-tiny and on CUDA, else 2)")
    ap.add_argument("--rounds", type=int, default=6, help="timing rounds; the sides alternate order")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per side before timing")
    ap.add_argument("--memory-steps", type=int, default=2, help="steps measured in each memory subprocess")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    add_device_arguments(ap, bf16="bf16 autocast in the timed and measured steps (parity stays float32)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    ap.add_argument("--memory-worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shapes is None:
        args.shapes = ["t5-tiny", "t5-small"] + (["t5-base"] if is_cuda(args.device) else [])
    return args


def environment(args) -> dict:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": args.device, "threads": args.threads,
            "gpu": device_name(args.device) if is_cuda(args.device) else None,
            "precision": "bf16 autocast" if args.bf16 else "float32"}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        shape = args.shapes[0]
        print(json.dumps(measure_memory(args.memory_worker, shape, sizes_for(shape, args), args.memory_steps,
                                        args.seed, args.device, args.bf16)))
        return
    env = environment(args)
    precision = "bf16 autocast over float32 weights" if args.bf16 else "float32"
    print(f"deltactl LoRA vs PEFT LoRA (r=8 on q, v; alpha 16; dropout 0), {precision}, train mode")
    print(", ".join(f"{k} {v}" for k, v in env.items() if v is not None))
    results = []
    for shape in args.shapes:
        result = bench_shape(shape, args)
        print_shape(result, args)
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
