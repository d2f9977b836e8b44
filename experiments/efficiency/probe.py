"""One efficiency measurement in a fresh process: a T5 shape, a method, a batch size → time and peak memory.

Run by run.py once per configuration, so that the peak resident memory of this process belongs to this
configuration alone. Prints one JSON line.

What is measured (CPU):
- ``peak_mib``: the process's peak resident set size (``getrusage`` ``ru_maxrss``) minus its resident size just
  before the model is built — weights, gradients, AdamW states and the activations of a training step, plus
  whatever the allocator holds on to. It is the CPU counterpart of the paper's peak GPU memory.
- ``forward_ms`` / ``backward_ms`` / ``optimizer_ms``: median wall time over the timed steps (after one warm-up
  step) of the loss computation, of ``loss.backward()``, and of the AdamW step.
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


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = rss_mib()
    model = T5ForConditionalGeneration(t5_config(args.shape, dropout_rate=0.0))
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
    model.train()
    times = {"forward": [], "backward": [], "optimizer": []}
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step:  # the first step is a warm-up (allocations, AdamW state creation)
            for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                times[key].append(1000 * value)
    result = {
        "shape": args.shape, "method": args.method, "batch": args.batch, "source_length": args.source_length,
        "target_length": args.target_length, "threads": args.threads, "steps": args.steps,
        "parameters": sum(q.numel() for q in model.parameters()), "trainable": sum(q.numel() for q in trainable),
        "peak_mib": peak_mib() - before, **{f"{k}_ms": statistics.median(v) for k, v in times.items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
