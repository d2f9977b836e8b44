"""Per-batch latency of robust-prefix inference against plain prefix inference (target: at most 3×).

all-MiniLM-L6-v2 with deltactl's default prefix (20 rows, MLP) and the sequence classifier; batches of SST-2 dev
sentences. The manifold comes from SST-2 training sentences classified by this (untrained) prefix model: the
latency does not depend on what the prefix learned. Peers timed in the same run: plain inference (one no-grad
forward), robust inference with the truncated rollout (blocks 0…N−2 while ψ is tuned), and robust inference
running the whole classifier at every tuning step.

    python benchmarks/robust_prefix_latency.py [--steps 2] [--layers 3] [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import deltactl as dc
from deltactl.inference import RobustPrefix, fit_manifold
from deltactl.tasks import get_task
from deltactl.train.models import SequenceClassifier


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="Adam steps on ψ per batch")
    parser.add_argument("--layers", type=int, default=3, help="N, the bottom states in the cost")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    from deltactl.train.run import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True)
    clf = SequenceClassifier(encoder, 2).eval()
    delta = dc.attach(encoder, "prefix")
    task = get_task("sst2")

    def batch_of(examples):
        return dict(tokenizer([e.text_a for e in examples], truncation=True, max_length=64, padding=True,
                              return_tensors="pt"))

    train = [batch_of(task.train[i:i + 64]) for i in range(0, 256, 64)]
    with torch.no_grad():
        labelled = [(b, clf(**b).argmax(-1)) for b in train]  # "correct" = agreeing with itself: timing only
    manifold = fit_manifold(delta, labelled, clf)
    batch = batch_of(task.dev[: args.batch])
    robust = RobustPrefix(delta, manifold, clf, n_layers=args.layers, steps=args.steps, lr=0.02)
    full = RobustPrefix(delta, manifold, clf, n_layers=args.layers, steps=args.steps, lr=0.02, truncate=False)

    def plain():
        with torch.no_grad():
            clf(**batch)

    t_plain = timed(plain, args.repeats)
    t_robust = timed(lambda: robust(**batch), args.repeats)
    t_full = timed(lambda: full(**batch), args.repeats)
    print(f"all-MiniLM-L6-v2 + prefix (20 rows), SST-2 dev batch {args.batch} (length {batch['input_ids'].shape[1]}),"
          f" N = {args.layers}, {args.steps} Adam steps, {args.threads} threads, median of {args.repeats}")
    print(f"plain prefix inference            {1000 * t_plain:8.1f} ms")
    load = os.getloadavg()[0]
    if load > len(os.sched_getaffinity(0)):
        print(f"warning: load average {load:.1f} on {len(os.sched_getaffinity(0))} cores: other work competes; "
              "absolute times are inflated, ratios are noisier")
    ratio = t_robust / t_plain
    print(f"robust, truncated rollout         {1000 * t_robust:8.1f} ms   ratio {ratio:.2f}x (target ≤ 3x)")
    print(f"robust, whole model every step    {1000 * t_full:8.1f} ms   ratio {t_full / t_plain:.2f}x")


if __name__ == "__main__":
    main()
