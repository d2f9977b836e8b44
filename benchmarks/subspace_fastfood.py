"""Fastfood against the dense projection, and the cost of SAID in a training step (CPU, float32).

1. D = 2^20, d = 1000: forward + backward (P z, then ∂/∂z) time and peak memory, Fastfood (both FWHT kernels)
   vs dense, each
   measured in its own process (peak resident memory above the process's baseline after imports).
2. Fastfood time over D = 2^16 … 2^22 (d = 1000), blocks of n = 1024 (the default, O(D log n)) and one block of
   n = D (O(D log D)), with time / (D log2 D) relative to the smallest D.
3. SAID over every weight of a t5-small-shaped model (random init, eager attention, batch 8 × 64 source / 8 target
   tokens, d = 1000): the projection forward + backward as a share of one SAID training step, and the step
   against a full fine-tuning step.

    python benchmarks/subspace_fastfood.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed run: the machine is shared


def projection_child(kind: str, d: int, D: int, repeat: int, block: int, kernel: str = "radix") -> dict:
    """Run in a fresh process: build the projection, time forward + backward, report peak memory."""
    from deltactl.subspace import make_projection

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    options = {"block": block, "kernel": kernel} if kind == "fastfood" else {}
    P = make_projection(kind, d, D, seed=0, **options)
    z = torch.zeros(d, requires_grad=True)
    g = torch.randn(D)

    def step():
        z.grad = None
        (P(z) * g).sum().backward()

    seconds = timed(step, repeat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"seconds": seconds, "peak_mib": (peak - base) / 1024}


def measure(kind, d, D, repeat, threads, block=1, kernel="radix") -> dict:
    code = (f"import json, torch; torch.set_num_threads({threads}); import benchmarks.subspace_fastfood as b; "
            f"print(json.dumps(b.projection_child({kind!r}, {d}, {D}, {repeat}, {block}, {kernel!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def said_share(d: int, repeat: int) -> dict:
    from transformers import T5ForConditionalGeneration

    from deltactl.shapes import t5_config
    from deltactl.subspace import intrinsic

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(t5_config("t5-small")).train()  # t5_config sets eager attention
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 32000, (8, 64), generator=g),
             "labels": torch.randint(2, 32000, (8, 8), generator=g)}

    ft_opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def ft_step():
        model(**batch).loss.backward()
        ft_opt.step()
        ft_opt.zero_grad(set_to_none=True)

    ft = timed(ft_step, repeat)
    sub = intrinsic(model, d, said=True)
    with torch.no_grad():
        sub.z.normal_()
    opt = torch.optim.AdamW(sub.trainable().values(), lr=1e-3)

    def said_step():
        sub(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step = timed(said_step, repeat)
    upstream = [torch.randn(s) for s in sub.shapes]

    def projection_only():  # P z split into scaled tensors, and its backward with a given upstream gradient
        torch.autograd.backward(sub.offsets(), upstream)
        sub.z.grad = sub.scales.grad = None

    proj = timed(projection_only, repeat)
    return {"D": sub.D, "d": d, "said_step_s": step, "projection_fwd_bwd_s": proj, "ft_step_s": ft,
            "projection_share_of_step": proj / step, "said_step_over_ft_step": step / ft}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds, for a smoke test)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--only", type=int, choices=(1, 2, 3), help="run one section only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeat = 3 if args.quick else 5
    d = 1000
    big = 2**16 if args.quick else 2**20
    results = {"threads": args.threads, "d": d}

    if args.only in (None, 1):
        head_to_head(args, d, big, repeat, results)
    if args.only in (None, 2):
        growth_with_D(args, d, repeat, results)
    if args.only in (None, 3) and not args.quick:
        print(f"\n== 3. SAID over every weight of a t5-small-shaped model (d = {d}, batch 8 × 64/8 tokens)")
        share = said_share(d, repeat=2)
        results["said_t5_small"] = share
        print(f"D = {share['D']:,}: SAID step {share['said_step_s']:.2f} s, projection fwd+bwd "
              f"{share['projection_fwd_bwd_s']:.3f} s = {share['projection_share_of_step']:.1%} of the step; "
              f"full fine-tuning step {share['ft_step_s']:.2f} s (SAID/FT ×{share['said_step_over_ft_step']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def head_to_head(args, d, big, repeat, results):
    print(f"== 1. P z forward + backward at D = 2^{int(math.log2(big))}, d = {d} ({args.threads} threads, float32)")
    ff = measure("fastfood", d, big, repeat, args.threads)
    ff2 = measure("fastfood", d, big, repeat, args.threads, kernel="butterfly")
    dense = measure("dense", d, big, repeat, args.threads)
    results["head_to_head"] = {"D": big, "fastfood": ff, "fastfood_butterfly": ff2, "dense": dense}
    for name, r in (("fastfood (radix-32 kernel)", ff), ("fastfood (radix-2 in-place)", ff2), ("dense", dense)):
        print(f"{name:28s} {r['seconds'] * 1e3:9.1f} ms  peak +{r['peak_mib']:8.1f} MiB")
    print(f"dense / fastfood: time ×{dense['seconds'] / ff['seconds']:.1f}, memory ×"
          f"{dense['peak_mib'] / max(ff['peak_mib'], 1e-3):.0f}; radix-2 / radix-32 kernel: time "
          f"×{ff2['seconds'] / ff['seconds']:.1f}")


def growth_with_D(args, d, repeat, results):
    print(f"\n== 2. Fastfood growth with D (d = {d}): blocks of n = 1024 and one block of n = D")
    growth = []
    exponents = range(16, 19) if args.quick else range(16, 23)
    for k in exponents:
        D = 2**k
        blocked = measure("fastfood", d, D, repeat, args.threads)["seconds"]
        single = measure("fastfood", d, D, repeat, args.threads, block=D)["seconds"]
        growth.append({"D": D, "blocked_s": blocked, "one_block_s": single})
    ref = growth[0]
    print(f"{'D':>10} {'n=1024 ms':>10} {'/D (rel)':>9} {'n=D ms':>9} {'/(D log D) (rel)':>17}")
    for row in growth:
        D, D0 = row["D"], ref["D"]
        per_d = (row["blocked_s"] / D) / (ref["blocked_s"] / D0)
        per_dlogd = (row["one_block_s"] / (D * math.log2(D))) / (ref["one_block_s"] / (D0 * math.log2(D0)))
        row.update(blocked_per_D_rel=per_d, one_block_per_DlogD_rel=per_dlogd)
        print(f"{D:>10} {row['blocked_s'] * 1e3:10.2f} {per_d:9.2f} {row['one_block_s'] * 1e3:9.2f} {per_dlogd:17.2f}")
    results["growth"] = growth


if __name__ == "__main__":
    main()
