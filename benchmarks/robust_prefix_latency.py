"""Per-batch latency of robust-prefix inference against plain prefix inference (target: at most 3×).

all-MiniLM-L6-v2 with deltactl's default prefix (20 rows, MLP) and the sequence classifier; batches of SST-2 dev
sentences. The manifold comes from SST-2 training sentences classified by this (untrained) prefix model: the
latency does not depend on what the prefix learned. Peers timed in the same run: plain inference (one no-grad
forward), robust inference with the truncated rollout (blocks 0…N−2 while ψ is tuned), and robust inference
running the whole classifier at every tuning step.

On CUDA (``--device cuda``, the default where there is a GPU) the device is synchronised around every timed call, and
each peer's peak memory is ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``
(on a CPU: "—"). ``--bf16`` runs the three peers under bf16 autocast (the manifold is fitted in float32).

    python benchmarks/robust_prefix_latency.py [--steps 2] [--layers 3] [--batch 32] [--repeats 5]
    python benchmarks/robust_prefix_latency.py --device cuda --bf16 --batch 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import deltactl as dc
from deltactl.inference import RobustPrefix, fit_manifold
from deltactl.tasks import get_task
from deltactl.train.models import SequenceClassifier

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import add_device_arguments, autocast, cuda_peak, is_cuda, mib, seconds  # noqa: E402


def timed(fn, repeats, device="cpu", bf16=False):
    """(median seconds of ``repeats`` calls after a warm-up call, CUDA peak bytes over them or None)."""
    def call():
        with autocast(device, bf16):
            fn()

    call()  # warm-up
    with cuda_peak(device, {}) as memory:
        times = [seconds(call, device) for _ in range(repeats)]
    return statistics.median(times), memory["peak_bytes"]


def peak(n_bytes) -> str:
    """The CUDA peak after a timing (nothing on a CPU, where none is measured)."""
    return "" if n_bytes is None else f"   peak {mib(n_bytes)} MiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="Adam steps on ψ per batch")
    parser.add_argument("--layers", type=int, default=3, help="N, the bottom states in the cost")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--manifold-examples", type=int, default=256,
                        help="SST-2 training sentences the manifold is fitted on, in batches of up to 64")
    add_device_arguments(parser, bf16="bf16 autocast over the three peers (the manifold is fitted in float32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    from deltactl.train.run import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(path, attn_implementation="eager", local_files_only=True).to(args.device)
    clf = SequenceClassifier(encoder, 2).to(args.device).eval()
    delta = dc.attach(encoder, "prefix")
    task = get_task("sst2")

    def batch_of(examples):
        tokens = tokenizer([e.text_a for e in examples], truncation=True, max_length=64, padding=True,
                           return_tensors="pt")
        return {k: v.to(args.device) for k, v in tokens.items()}

    n = args.manifold_examples
    train = [batch_of(task.train[i:min(i + 64, n)]) for i in range(0, n, 64)]
    with torch.no_grad():
        labelled = [(b, clf(**b).argmax(-1)) for b in train]  # "correct" = agreeing with itself: timing only
    manifold = fit_manifold(delta, labelled, clf)
    batch = batch_of(task.dev[: args.batch])
    robust = RobustPrefix(delta, manifold, clf, n_layers=args.layers, steps=args.steps, lr=0.02)
    full = RobustPrefix(delta, manifold, clf, n_layers=args.layers, steps=args.steps, lr=0.02, truncate=False)

    def plain():
        with torch.no_grad():
            clf(**batch)

    t_plain, m_plain = timed(plain, args.repeats, args.device, args.bf16)
    t_robust, m_robust = timed(lambda: robust(**batch), args.repeats, args.device, args.bf16)
    t_full, m_full = timed(lambda: full(**batch), args.repeats, args.device, args.bf16)
    where = args.device if is_cuda(args.device) else f"{args.threads} threads"
    precision = "bf16 autocast" if args.bf16 else "float32"
    print(f"all-MiniLM-L6-v2 + prefix (20 rows), SST-2 dev batch {args.batch} (length {batch['input_ids'].shape[1]}),"
          f" N = {args.layers}, {args.steps} Adam steps, {where}, {precision}, median of {args.repeats}")
    print(f"plain prefix inference            {1000 * t_plain:8.1f} ms{peak(m_plain)}")
    load = os.getloadavg()[0]
    if not is_cuda(args.device) and load > len(os.sched_getaffinity(0)):
        print(f"warning: load average {load:.1f} on {len(os.sched_getaffinity(0))} cores: other work competes; "
              "absolute times are inflated, ratios are noisier")
    ratio = t_robust / t_plain
    print(f"robust, truncated rollout         {1000 * t_robust:8.1f} ms   ratio {ratio:.2f}x (target ≤ 3x)"
          f"{peak(m_robust)}")
    print(f"robust, whole model every step    {1000 * t_full:8.1f} ms   ratio {t_full / t_plain:.2f}x{peak(m_full)}")
    return {"plain_s": t_plain, "robust_s": t_robust, "full_s": t_full, "robust_over_plain": ratio,
            "full_over_plain": t_full / t_plain, "plain_peak_bytes": m_plain, "robust_peak_bytes": m_robust,
            "full_peak_bytes": m_full}


if __name__ == "__main__":
    main()
