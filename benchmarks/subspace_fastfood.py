"""Fastfood against the dense projection, and the cost of SAID in a training step (CPU or CUDA, float32 or bf16).

1. D = 2^20, d = 1000: forward + backward (P z, then ∂/∂z) time and peak memory, Fastfood (both FWHT kernels)
   vs dense, each
   measured in its own process (peak resident memory above the process's baseline after imports).
2. Fastfood time over D = 2^16 … 2^22 (d = 1000), blocks of n = 1024 (the default, O(D log n)) and one block of
   n = D (O(D log D)), with time / (D log2 D) relative to the smallest D.
3. SAID over every weight of a t5-small-shaped model (random init, eager attention, batch 8 × 64 source / 8 target
   tokens, d = 1000): the projection forward + backward as a share of one SAID training step, and the step
   against a full fine-tuning step.

On CUDA (``--device cuda``, the default where there is a GPU) every timed call is synchronised, and peak memory is
``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()`` (sections 1 and 2: the
projection's buffers and its forward + backward, in a fresh process; section 3: the SAID and the full fine-tuning
step). On a CPU sections 1 and 2 report the peak resident set over the fresh process's baseline, section 3 no
memory. ``--bf16`` runs every forward (P z, the model) under bf16 autocast. ``--tiny`` is the smallest variant
(d = 64, D = 2^12 … 2^13, section 3 on t5-tiny), for the tests; ``--same-process`` measures sections 1 and 2 in this
process (faster; on a CPU their memory is then not measured).

    python benchmarks/subspace_fastfood.py [--quick] [--threads N] [--device cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import add_device_arguments, autocast, cuda_peak, free, is_cuda, mib, seconds  # noqa: E402

# d, D of section 1, the exponents of section 2, and section 3's shape with its (batch, source, target) per size
SIZES = {
    "full": {"d": 1000, "big": 2**20, "exponents": range(16, 23), "said": ("t5-small", (8, 64, 8))},
    "quick": {"d": 1000, "big": 2**16, "exponents": range(16, 19), "said": None},
    "tiny": {"d": 64, "big": 2**12, "exponents": range(12, 14), "said": ("t5-tiny", (2, 16, 4))},
}


def timed(fn, repeat: int, device="cpu") -> float:
    fn()  # warm-up
    return min(seconds(fn, device) for _ in range(repeat))  # the least disturbed run: the machine is shared


def projection_child(kind: str, d: int, D: int, repeat: int, block: int, kernel: str = "radix", device: str = "cpu",
                     bf16: bool = False, fresh: bool = True) -> dict:
    """Build the projection, time forward + backward, report peak memory. ``fresh``: this is a fresh process, whose
    peak resident set over its baseline is the projection's (on a CPU; on CUDA the allocator's peak is exact)."""
    from deltactl.subspace import make_projection

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    options = {"block": block, "kernel": kernel} if kind == "fastfood" else {}
    with cuda_peak(device, {}) as cuda:
        P = make_projection(kind, d, D, seed=0, **options).to(device)
        z = torch.zeros(d, requires_grad=True, device=device)
        g = torch.randn(D, device=device)

        def step():
            z.grad = None
            with autocast(device, bf16):
                y = P(z)
            (y * g).sum().backward()

        seconds = timed(step, repeat, device)
    if is_cuda(device):
        peak_mib = cuda["extra_bytes"] / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        peak_mib = (peak - base) / 1024 if fresh else None
    return {"seconds": seconds, "peak_mib": peak_mib}


def measure(kind, d, D, repeat, threads, block=1, kernel="radix", device="cpu", bf16=False,
            same_process=False) -> dict:
    if same_process:
        return projection_child(kind, d, D, repeat, block, kernel, device, bf16, fresh=False)
    code = (f"import json, sys, torch; torch.set_num_threads({threads}); sys.path.insert(0, {HERE!r}); "
            f"import subspace_fastfood as b; print(json.dumps(b.projection_child({kind!r}, {d}, {D}, {repeat}, "
            f"{block}, {kernel!r}, {device!r}, {bf16!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def said_share(d: int, repeat: int, device: str = "cpu", bf16: bool = False, shape: str = "t5-small",
               size=(8, 64, 8)) -> dict:
    from transformers import T5ForConditionalGeneration

    from deltactl.shapes import t5_config
    from deltactl.subspace import intrinsic

    torch.manual_seed(0)
    config = t5_config(shape)  # t5_config sets eager attention
    model = T5ForConditionalGeneration(config).to(device).train()
    g = torch.Generator().manual_seed(0)
    batch_size, source, target = size
    batch = {"input_ids": torch.randint(2, config.vocab_size, (batch_size, source), generator=g).to(device),
             "labels": torch.randint(2, config.vocab_size, (batch_size, target), generator=g).to(device)}

    ft_opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def ft_step():
        with autocast(device, bf16):
            loss = model(**batch).loss
        loss.backward()
        ft_opt.step()
        ft_opt.zero_grad(set_to_none=True)

    with cuda_peak(device, {}) as ft_memory:
        ft = timed(ft_step, repeat, device)
    ft_opt.state.clear()  # the AdamW state of every weight is no part of the SAID step's memory
    free(device)
    sub = intrinsic(model, d, said=True)
    with torch.no_grad():
        sub.z.normal_()
    opt = torch.optim.AdamW(sub.trainable().values(), lr=1e-3)

    def said_step():
        with autocast(device, bf16):
            loss = sub(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with cuda_peak(device, {}) as said_memory:
        step = timed(said_step, repeat, device)
    upstream = [torch.randn(s, device=device) for s in sub.shapes]

    def projection_only():  # P z split into scaled tensors, and its backward with a given upstream gradient
        with autocast(device, bf16):
            offsets = sub.offsets()
        torch.autograd.backward(offsets, [u.to(o.dtype) for u, o in zip(upstream, offsets)])
        sub.z.grad = sub.scales.grad = None

    proj = timed(projection_only, repeat, device)
    return {"shape": shape, "batch": list(size), "D": sub.D, "d": d, "said_step_s": step,
            "projection_fwd_bwd_s": proj, "ft_step_s": ft, "projection_share_of_step": proj / step,
            "said_step_over_ft_step": step / ft, "said_peak_bytes": said_memory["peak_bytes"],
            "ft_peak_bytes": ft_memory["peak_bytes"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds, for a smoke test)")
    parser.add_argument("--tiny", action="store_true", help="the smallest sizes (for the tests)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--only", type=int, choices=(1, 2, 3), help="run one section only")
    parser.add_argument("--same-process", action="store_true",
                        help="measure sections 1 and 2 in this process (on a CPU: no memory figures)")
    add_device_arguments(parser, bf16="bf16 autocast over every forward (P z, the model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    repeat = 1 if args.tiny else 3 if args.quick else 5
    d = sizes["d"]
    big = sizes["big"]
    results = {"threads": args.threads, "d": d, "device": args.device, "bf16": args.bf16}

    if args.only in (None, 1):
        head_to_head(args, d, big, repeat, results)
    if args.only in (None, 2):
        growth_with_D(args, d, repeat, results, sizes["exponents"])
    if args.only in (None, 3) and sizes["said"]:
        shape, size = sizes["said"]
        print(f"\n== 3. SAID over every weight of a {shape}-shaped model (d = {d}, batch {size[0]} × "
              f"{size[1]}/{size[2]} tokens)")
        share = said_share(d, 1 if args.tiny else 2, args.device, args.bf16, shape, size)
        results["said_" + shape.replace("-", "_")] = share
        print(f"D = {share['D']:,}: SAID step {share['said_step_s']:.2f} s, projection fwd+bwd "
              f"{share['projection_fwd_bwd_s']:.3f} s = {share['projection_share_of_step']:.1%} of the step; "
              f"full fine-tuning step {share['ft_step_s']:.2f} s (SAID/FT ×{share['said_step_over_ft_step']:.2f})")
        if share["ft_peak_bytes"]:
            ratio = share["said_peak_bytes"] / share["ft_peak_bytes"]
            print(f"peak memory: SAID step {mib(share['said_peak_bytes'])} MiB, full fine-tuning step "
                  f"{mib(share['ft_peak_bytes'])} MiB (SAID/FT ×{ratio:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def setting(args) -> str:
    where = args.device if is_cuda(args.device) else f"{args.threads} threads"
    return f"{where}, {'bf16 autocast' if args.bf16 else 'float32'}"


def head_to_head(args, d, big, repeat, results):
    print(f"== 1. P z forward + backward at D = 2^{int(math.log2(big))}, d = {d} ({setting(args)})")
    where = {"device": args.device, "bf16": args.bf16, "same_process": args.same_process}
    ff = measure("fastfood", d, big, repeat, args.threads, **where)
    ff2 = measure("fastfood", d, big, repeat, args.threads, kernel="butterfly", **where)
    dense = measure("dense", d, big, repeat, args.threads, **where)
    results["head_to_head"] = {"D": big, "fastfood": ff, "fastfood_butterfly": ff2, "dense": dense}
    for name, r in (("fastfood (radix-32 kernel)", ff), ("fastfood (radix-2 in-place)", ff2), ("dense", dense)):
        peak = "—" if r["peak_mib"] is None else f"+{r['peak_mib']:8.1f} MiB"
        print(f"{name:28s} {r['seconds'] * 1e3:9.1f} ms  peak {peak}")
    memory = "—" if dense["peak_mib"] is None else f"{dense['peak_mib'] / max(ff['peak_mib'], 1e-3):.0f}"
    print(f"dense / fastfood: time ×{dense['seconds'] / ff['seconds']:.1f}, memory ×{memory}; radix-2 / radix-32 "
          f"kernel: time ×{ff2['seconds'] / ff['seconds']:.1f}")


def growth_with_D(args, d, repeat, results, exponents):
    print(f"\n== 2. Fastfood growth with D (d = {d}): blocks of n = 1024 and one block of n = D ({setting(args)})")
    growth = []
    where = {"device": args.device, "bf16": args.bf16, "same_process": args.same_process}
    for k in exponents:
        D = 2**k
        blocked = measure("fastfood", d, D, repeat, args.threads, **where)["seconds"]
        single = measure("fastfood", d, D, repeat, args.threads, block=D, **where)["seconds"]
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
