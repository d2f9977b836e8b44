"""Training-step time of a T5 with attached LoRA, eager against ``torch.compile``, in the same run.

The same model (fixed seed, float32, train mode, no dropout) with LoRA r = 8 on q and v runs a step = forward with
labels + backward + AdamW; the compiled side wraps the model in ``torch.compile(backend=...)``. First the two sides
are checked to compute the same loss and LoRA gradients (within float32 rounding of the fused kernels), then the
compile time (the first compiled step) is reported, and ``--rounds`` alternating rounds of ``--steps`` steps give
each side's median step time and the median within-round ratio compiled / eager. Inductor builds C++ kernels on a
CPU: the first step takes minutes on a small machine, which is why the tests compile with ``aot_eager`` only.

On CUDA the device is synchronised around every timed region, and each side's peak memory over its timed steps is
``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()`` (on a CPU: "—"). ``--bf16``
runs the timed steps' forward passes under bf16 autocast over the float32 weights (the parity check stays float32;
the compiled side recompiles once for autocast, during the warm-up).

Usage::

    python benchmarks/compile_step.py                          # t5-tiny, inductor, 1 thread
    python benchmarks/compile_step.py --shape t5-small --batch 8 --source 128 --target 32
    python benchmarks/compile_step.py --device cuda --bf16 --shape t5-base --batch 32 --source 128 --target 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from transformers import T5ForConditionalGeneration

import deltactl as dc
from deltactl.shapes import t5_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import add_device_arguments, autocast, cuda_peak, mib, seconds  # noqa: E402


def batch_for(config, batch: int, source: int, target: int, device) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, config.vocab_size, (batch, source), generator=g)
    labels = torch.randint(2, config.vocab_size, (batch, target), generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="t5-tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--source", type=int, default=32)
    parser.add_argument("--target", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, …)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    add_device_arguments(parser, bf16="bf16 autocast in the timed steps (parity stays float32)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: a tiny model's ops are too small to share, and a second thread contends "
                             "with any other load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = t5_config(args.shape, dropout_rate=0.0)
    model = T5ForConditionalGeneration(config).to(args.device).train()
    delta = dc.attach(model, "lora", r=8, alpha=16.0)
    with torch.no_grad():
        for name, p in delta.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.02)  # an update that is not zero
    params = list(delta.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = batch_for(config, args.batch, args.source, args.target, args.device)
    compiled = torch.compile(model, backend=args.backend)

    def step(forward):
        with autocast(args.device, args.bf16):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    # Parity on one batch, before any optimiser step.
    eager_loss = model(**batch).loss
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled_out = {}

    def first_compiled():
        compiled_out["loss"] = compiled(**batch).loss
        compiled_out["grads"] = torch.autograd.grad(compiled_out["loss"], params)

    compile_s = seconds(first_compiled, args.device)
    compiled_loss, compiled_grads = compiled_out["loss"], compiled_out["grads"]
    grad_diff = max((a - b).abs().max().item() for a, b in zip(eager_grads, compiled_grads))
    grad_size = max(g.abs().max().item() for g in eager_grads)
    precision = "bf16 autocast" if args.bf16 else "float32"
    print(f"{args.shape} batch {args.batch}×{args.source}→{args.target}, LoRA r=8 on q, v; {args.device}, "
          f"{torch.get_num_threads()} threads, backend {args.backend}, {precision}")
    print(f"parity: loss {eager_loss.item():.6f} eager vs {compiled_loss.item():.6f} compiled; LoRA gradients differ "
          f"by at most {grad_diff:.2e} (largest gradient {grad_size:.2e})")
    print(f"compile (first forward + backward): {compile_s:.1f} s")

    for forward in (model, compiled, model, compiled):  # warm-up
        step(forward)
    times = {"eager": [], "compiled": []}
    peaks = {"eager": [], "compiled": []}  # CUDA peak bytes of each side's timed steps, per round
    ratios = []
    for r in range(args.rounds):
        order = (("eager", model), ("compiled", compiled)) if r % 2 == 0 else (("compiled", compiled), ("eager", model))
        this = {}
        for name, forward in order:
            def steps(forward=forward):
                for _ in range(args.steps):
                    step(forward)

            with cuda_peak(args.device, {}) as memory:
                this[name] = seconds(steps, args.device) / args.steps
            times[name].append(this[name])
            peaks[name].append(memory["peak_bytes"])
        ratios.append(this["compiled"] / this["eager"])
    eager_ms, compiled_ms = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
    ratio = statistics.median(ratios)
    peak = {k: None if None in v else max(v) for k, v in peaks.items()}
    print(f"step: eager {eager_ms:.2f} ms, compiled {compiled_ms:.2f} ms; compiled / eager {ratio:.3f} "
          f"(median of {args.rounds} within-round ratios)")
    if peak["eager"]:
        print(f"peak memory of the steps: eager {mib(peak['eager'])} MiB, compiled {mib(peak['compiled'])} MiB; "
              f"compiled / eager {peak['compiled'] / peak['eager']:.3f}")
    else:
        print("peak memory of the steps: — (measured on CUDA only)")
    load = os.getloadavg()[0]
    if args.device == "cpu" and load > (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other processes competed, rerun")
    return {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "ratio": ratio, "compile_s": compile_s,
            "grad_diff": grad_diff, "eager_peak_bytes": peak["eager"], "compiled_peak_bytes": peak["compiled"]}


if __name__ == "__main__":
    main()
