"""One efficiency measurement in a fresh process: a T5 shape, a method, a batch size → time and peak memory.

Run by run.py once per configuration, so that the peak resident memory of this process belongs to this
configuration alone. Prints one JSON line.

What is measured:
- ``peak_mib``: on the CPU, the process's peak resident set size during training (``VmHWM``, reset through
  ``/proc/self/clear_refs`` once the model is built, so the transient of building it is not counted) minus its
  resident size just before the model is built — weights, gradients, AdamW states and the activations of a
  training step, plus whatever the allocator holds on to; the CPU counterpart of the paper's peak GPU memory. On a
  GPU (``--device cuda``), ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the same
  point, minus the allocation before the model: the same quantities, as the caching allocator counts them
  (``memory`` names which was measured). ``built_mib``: the same baseline's growth once the model, δ and batch
  exist (the weights, mostly).
- ``forward_ms`` / ``backward_ms`` / ``optimizer_ms``: median wall time over the timed steps (after one warm-up
  step) of the loss computation, of ``loss.backward()``, and of the AdamW step (the GPU synchronised before each
  reading). ``--bf16``: the loss computation under bfloat16 autocast.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # a checkout without installing

import torch  # noqa: E402
from transformers import T5ForConditionalGeneration  # noqa: E402

import deltactl as dc  # noqa: E402
from deltactl.shapes import t5_config  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Lower this process's resident high-water mark (VmHWM) to its current resident size (Linux: write 5 to
    /proc/self/clear_refs); False where that cannot be done (then the peak also covers building the model)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmHWM") is not None
    except OSError:
        return False


def peak_mib() -> float:
    # VmHWM is this process's own high-water mark (ru_maxrss also keeps the peak of the process it was forked
    # from, and it cannot be reset); both are KiB and updated lazily, so the current resident size can be a few
    # pages above them
    hwm = _status_mib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(hwm, rss_mib())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", required=True)
    p.add_argument("--method", required=True, help="ft, or a registered delta method")
    p.add_argument("--options", default="{}", help="method options as JSON")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--source-length", type=int, default=128)
    p.add_argument("--target-length", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (peak memory from the CUDA allocator)")
    p.add_argument("--bf16", action="store_true", help="the loss computation under bfloat16 autocast")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if gpu else rss_mib()
    model = T5ForConditionalGeneration(t5_config(args.shape, dropout_rate=0.0)).to(device)
    if args.method == "ft":
        trainable = [q for q in model.parameters()]
    else:
        delta = dc.attach(model, args.method, **json.loads(args.options))
        trainable = list(delta.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(2, vocab, (args.batch, args.source_length), generator=g),
        "attention_mask": torch.ones(args.batch, args.source_length, dtype=torch.long),
        "labels": torch.randint(2, vocab, (args.batch, args.target_length), generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    # The peak is reset here, after the model is built: building a T5 transiently holds more than its weights
    # (on the CPU, t5-small peaks ~190 MiB above its built size), a peak that would hide the training step's
    # own when that is smaller (it did: four methods at batch 1 reported the same 423 MiB). What remains counted
    # from ``before``: the weights, δ, then the gradients, AdamW states and activations of the training steps.
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
        reset = True
    else:
        reset = reset_peak()
    built = (torch.cuda.memory_allocated(device) / 2**20 if gpu else rss_mib()) - before

    def clock() -> float:  # a GPU runs ahead of the Python thread: wait for it before reading the time
        if gpu:
            torch.cuda.synchronize(device)
        return time.perf_counter()

    model.train()
    times = {"forward": [], "backward": [], "optimizer": []}
    for step in range(args.steps + 1):
        t0 = clock()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        t1 = clock()
        loss.backward()
        t2 = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = clock()
        if step:  # the first step is a warm-up (allocations, AdamW state creation)
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(1000 * value)
    result = {
        "shape": args.shape, "method": args.method, "batch": args.batch, "source_length": args.source_length,
        "target_length": args.target_length, "threads": args.threads, "steps": args.steps,
        "parameters": sum(q.numel() for q in model.parameters()), "trainable": sum(q.numel() for q in trainable),
        "device": device.type, "bf16": args.bf16,
        "memory": "cuda max_memory_allocated" if gpu else "cpu peak resident set",
        "peak_mib": (torch.cuda.max_memory_allocated(device) / 2**20 if gpu else peak_mib()) - before,
        "built_mib": built, "peak_reset_after_build": reset,
        **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
