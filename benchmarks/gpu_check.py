"""One GPU check: deltactl's delta methods against PEFT's and against full fine-tuning, side by side in one process.

What it measures (on one CUDA GPU, T5-base and T5-large shapes from ``deltactl.shapes``: random init, eager
attention, dropout 0; source 128 tokens, target 32; bf16 autocast over float32 weights unless ``--precision``):

1. Correctness first. For every method that PEFT also has (LoRA, IA3, prefix, prompt) deltactl's δ is randomised,
   exported with ``deltactl.export_peft`` and loaded into PEFT on a copy of the same weights; the logits of both
   sides are compared in float32 (max abs diff, OK within a float32 tolerance, and the δ must visibly change the
   output so the check is not vacuous). Adapter and BitFit, which PEFT does not have, are checked against the
   frozen model at δ = 0 (the zero-control contract). Merged LoRA, ``generate`` and SAID have their own checks.
2. Training step (forward + backward + AdamW step, CUDA-synchronised, median of ``--steps`` steps after warm-up)
   and peak memory (``torch.cuda.reset_peak_memory_stats()`` before the timed steps,
   ``torch.cuda.max_memory_allocated()`` after: weights + optimizer state + activations of one side alone) at
   batch 8 and 32 for deltactl's LoRA, IA3, prefix, prompt, adapter and BitFit, PEFT's LoRA, IA3, prefix and prompt,
   and full fine-tuning; ratios deltactl/PEFT and method/FT. Prefix acts in decoder self-attention only on both
   sides (where PEFT puts prefixes on T5), so the two are compared like with like.
3. Memory saved against full fine-tuning at batch 1 on T5-large (the delta-tuning paper: up to 3/4).
4. Inference on T5-base: forward latency of the base model, of deltactl's unmerged LoRA and of the merged one
   (merged / base should be 1.00), and ``generate`` latency of deltactl's unmerged LoRA against PEFT's.
5. SAID (Fastfood projection) over every T5-base weight: the projection's forward + backward as a share of a SAID
   training step (goal ≤ 25%), timed alone and inside the step on the same device.

Results go to ``--out`` (default ``benchmarks/results/``) as ``gpu_check.json`` and ``gpu_check.md``, each written
atomically (temp file + rename). Without a GPU it prints "no GPU" and runs the same code paths on a t5-tiny shape
(batch 1 and 2, float32, a few steps), writing ``gpu_check_tiny.*``; ``tests/test_gpu_check.py`` runs that variant.
The exit status is 1 when a correctness check fails, else 0.

Usage::

    python benchmarks/gpu_check.py                  # the full table on one H100/H200 (a few minutes)
    python benchmarks/gpu_check.py --tiny           # the small variant (what runs without a GPU)
    python benchmarks/gpu_check.py --steps 20 --precision bf16 --out /tmp/results
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import T5ForConditionalGeneration

import deltactl as dc
from deltactl.control.controller import site_key
from deltactl.shapes import t5_config
from deltactl.subspace import intrinsic

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared timing helpers beside this script
from timing import MIB, cuda_peak, free, seconds  # noqa: E402

# deltactl method -> attach options. Prefix sits where PEFT puts it on T5 (decoder self-attention, rows without the
# reparameterisation MLP) so that the PEFT comparison is like with like; prompt and prefix use 20 rows.
DELTACTL = {
    "lora": {},
    "ia3": {},
    "prefix": {"length": 20, "reparameterize": False, "sites": ("decoder.*.attn.kv",)},
    "prompt": {"length": 20},
    "adapter": {},
    "bitfit": {},
}
WITH_PEFT = ("lora", "ia3", "prefix", "prompt")
CHECK_REL_TOL = 1e-4  # float32: max |diff| of logits ≤ this × max(1, max |logit|)
SAID_GOAL = 0.25  # the projection's share of a SAID step we aim for


@dataclass(frozen=True)
class Plan:
    """What one run measures: shapes with their batch sizes, lengths, and the shapes of the extra sections."""

    batches: dict  # shape -> batch sizes of the training table
    source_len: int
    target_len: int
    memory_shape: str  # batch-1 memory saved against FT
    small_shape: str  # inference latency and SAID
    said_d: int
    new_tokens: int
    steps: int
    warmup: int


FULL = Plan(batches={"t5-base": (8, 32), "t5-large": (1, 8, 32)}, source_len=128, target_len=32,
            memory_shape="t5-large", small_shape="t5-base", said_d=1000, new_tokens=32, steps=10, warmup=3)
TINY = Plan(batches={"t5-tiny": (1, 2)}, source_len=16, target_len=8, memory_shape="t5-tiny", small_shape="t5-tiny",
            said_d=100, new_tokens=4, steps=2, warmup=1)


# ---- device, precision, timing, memory ------------------------------------------------------------------------


def precision_context(precision: str, device: str):
    """bf16 autocast around forward passes for ``autocast``; nothing for ``fp32`` and ``bf16`` (bf16 weights)."""
    if precision == "autocast":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cast(model, precision: str):
    return model.to(torch.bfloat16) if precision == "bf16" else model


@contextlib.contextmanager
def exact_float32():
    """Float32 matmuls without TF32 (the checks compare two float32 computations, not two TF32 ones)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def median_ms(fn, steps: int, warmup: int, device: str) -> float:
    """Median wall time of ``fn`` in ms over ``steps`` calls after ``warmup`` calls, synchronised per call."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(seconds(fn, device) for _ in range(steps))


@contextlib.contextmanager
def peak_memory(device: str, into: dict):
    """Sets ``into["peak_mib"]``: the CUDA peak of allocated memory inside the block (None on CPU)."""
    with cuda_peak(device, {}) as measured:
        yield
    into["peak_mib"] = None if measured["peak_bytes"] is None else measured["peak_bytes"] / MIB


# ---- models, batches and the two sides --------------------------------------------------------------------------


def build_template(shape: str, device: str, seed: int) -> T5ForConditionalGeneration:
    """The random-init model every side copies, kept on the CPU so it is in no side's GPU memory."""
    torch.manual_seed(seed)
    with torch.device(device):  # initialising on the GPU is much faster for T5-large
        model = T5ForConditionalGeneration(t5_config(shape, dropout_rate=0.0))
    return model.to("cpu").float()


def fresh(template, device: str):
    return copy.deepcopy(template).to(device)


def make_batch(vocab: int, batch: int, source_len: int, target_len: int, device: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, source_len), generator=g)
    mask = torch.ones(batch, source_len, dtype=torch.long)
    mask[-1, source_len // 2:] = 0  # one padded row, so the masks matter
    labels = torch.randint(2, vocab, (batch, target_len), generator=g)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def attach_deltactl(model, method: str, seed: int, randomise: bool = True):
    """Attach a deltactl method; with ``randomise``, δ gets noise so its effect is not zero (same δ for a seed)."""
    torch.manual_seed(seed)  # methods draw their initial δ (LoRA's A, prefix rows) from the global generator
    delta = dc.attach(model, method, **DELTACTL[method])
    if randomise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in delta.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))
        if method == "prefix":
            tie_prefix_rows(delta)
    return delta


def tie_prefix_rows(delta) -> None:
    """Give decoder layers l and l + L/2 the same rows, as PEFT's T5 layout does for an even depth L (layer l reads
    slots 4l and 4l+1 mod 2L of PEFT's embedding); otherwise PEFT cannot hold the prefix and export refuses it."""
    sites = delta.controller.sites
    depth = len(sites)
    if depth % 2:
        return
    with torch.no_grad():
        for site in sites[depth // 2:]:
            twin = sites[site.layer - depth // 2]
            delta.controller.rows[site_key(site.name)].copy_(delta.controller.rows[site_key(twin.name)])


def peft_from_folder(model, folder: Path, device: str):
    """PEFT's model for the adapter that ``deltactl.export_peft`` wrote to ``folder``, trainable, on ``model``.

    ``get_peft_model`` + ``set_peft_model_state_dict`` rather than ``PeftModel.from_pretrained``: PEFT refuses to
    load a prompt-learning adapter as trainable. LoRA and IA3 export without a task type: they get the seq2seq one.
    """
    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = False
    if config.task_type is None:
        config.task_type = "SEQ_2_SEQ_LM"
    peft_model = get_peft_model(model, config)
    # (PEFT lists prompt_embeddings as unexpected for prompt learning although it loads them: the check sees it)
    set_peft_model_state_dict(peft_model, load_file(str(folder / "adapter_model.safetensors")))
    return peft_model.to(device)


def build_side(side: str, method: str, template, folders: dict, args):
    """The model to train for one side ("deltactl", "peft" or "ft"), on a fresh copy of the template."""
    model = fresh(template, args.device)
    if side == "deltactl":
        attach_deltactl(model, method, args.seed)
    elif side == "peft":
        model = peft_from_folder(model, folders[method], args.device)
    return cast(model, args.precision).train()


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


# ---- correctness ------------------------------------------------------------------------------------------------


def verdict(diff: float, reference: torch.Tensor, effect: float | None = None) -> dict:
    """OK when ``diff`` is within float32 tolerance of the reference's scale, and the δ changed the output."""
    tol = CHECK_REL_TOL * max(1.0, reference.abs().max().item())
    ok = diff <= tol and (effect is None or effect > 10 * tol)
    return {"max_abs_diff": diff, "tol": tol, "effect": effect, "ok": bool(ok)}


def check_against_peft(template, method: str, folder: Path, batch: dict, args) -> dict:
    """deltactl's randomised δ exported into PEFT on the same weights: logits agree in float32 (and writes the
    adapter folder that the PEFT side of the timing loads)."""
    with exact_float32():
        model = fresh(template, args.device).eval()
        base = logits_of(model, batch)
        delta = attach_deltactl(model, method, args.seed)
        ours = logits_of(model, batch)
        dc.export_peft(delta, folder)
        peft_model = peft_from_folder(fresh(template, args.device), folder, args.device).eval()
        theirs = logits_of(peft_model, batch)
    result = verdict((ours - theirs).abs().max().item(), theirs, effect=(ours - base).abs().max().item())
    return {"against": "PEFT, same δ and weights", **result}


def check_zero_control(template, method: str, batch: dict, args) -> dict:
    """No PEFT counterpart: the attached method at its initial δ computes the frozen model (zero control)."""
    with exact_float32():
        model = fresh(template, args.device).eval()
        base = logits_of(model, batch)
        attach_deltactl(model, method, args.seed, randomise=False)
        ours = logits_of(model, batch)
    return {"against": "frozen model at initial δ", **verdict((ours - base).abs().max().item(), base)}


def run_checks(shape: str, template, folders: dict, args, plan: Plan) -> list[dict]:
    batch = make_batch(template.config.vocab_size, 2, plan.source_len, plan.target_len, args.device, args.seed + 1)
    rows = []
    for method in DELTACTL:
        if method in WITH_PEFT:
            result = check_against_peft(template, method, folders[method], batch, args)
        else:
            result = check_zero_control(template, method, batch, args)
        rows.append({"shape": shape, "method": method, **result})
        free(args.device)
    return rows


# ---- training step: time and peak memory --------------------------------------------------------------------------


def sides() -> list[tuple[str, str]]:
    """(side, method) in table order: each deltactl method, then PEFT's where it exists; full fine-tuning last."""
    out = []
    for method in DELTACTL:
        out.append(("deltactl", method))
        if method in WITH_PEFT:
            out.append(("peft", method))
    return out + [("ft", "full")]


def train_step(model, batch: dict, optimizer, args) -> None:
    """Forward with labels (under the precision's autocast), backward, AdamW step."""
    with precision_context(args.precision, args.device):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_side(model, batch_sizes, shape: str, args, plan: Plan) -> list[dict]:
    """Step time and peak memory of one side at each batch size (the optimizer state carries across sizes)."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)
    n_trainable = sum(p.numel() for p in trainable(model))
    rows = []
    for size in batch_sizes:
        batch = make_batch(model.config.vocab_size, size, plan.source_len, plan.target_len, args.device, args.seed + 1)
        step = functools.partial(train_step, model, batch, optimizer, args)
        for _ in range(plan.warmup):  # also allocates the AdamW state before the peak is reset
            step()
        memory = {}
        with peak_memory(args.device, memory):
            ms = median_ms(step, plan.steps, 0, args.device)
        rows.append({"shape": shape, "batch": size, "trainable": n_trainable, "ms_per_step": ms, **memory})
    return rows


def measure_training(shape: str, template, folders: dict, args, plan: Plan) -> list[dict]:
    rows = []
    for side, method in sides():
        model = build_side(side, method, template, folders, args)
        for row in measure_side(model, plan.batches[shape], shape, args, plan):
            rows.append({"side": side, "method": method, **row})
        del model
        free(args.device)
    return rows


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(rows: list[dict]) -> None:
    """Time and memory of each row over PEFT's same method (deltactl rows) and over full fine-tuning."""
    index = {(r["shape"], r["batch"], r["side"], r["method"]): r for r in rows}
    for r in rows:
        ft = index[(r["shape"], r["batch"], "ft", "full")]
        peer = index.get((r["shape"], r["batch"], "peft", r["method"])) if r["side"] == "deltactl" else None
        r["time_vs_peft"] = ratio(r["ms_per_step"], peer["ms_per_step"]) if peer else None
        r["memory_vs_peft"] = ratio(r["peak_mib"], peer["peak_mib"]) if peer else None
        r["time_vs_ft"] = ratio(r["ms_per_step"], ft["ms_per_step"])
        r["memory_vs_ft"] = ratio(r["peak_mib"], ft["peak_mib"])


def memory_saved(rows: list[dict], shape: str) -> list[dict]:
    """1 − peak / FT's peak at batch 1 on ``shape``, per side."""
    out = []
    for r in rows:
        if r["shape"] == shape and r["batch"] == 1 and r["side"] != "ft":
            saved = 1 - r["memory_vs_ft"] if r["memory_vs_ft"] is not None else None
            out.append({"side": r["side"], "method": r["method"], "peak_mib": r["peak_mib"], "saved_vs_ft": saved})
    return out


# ---- inference: merged LoRA and generate ------------------------------------------------------------------------


def greedy(model, batch: dict, new_tokens: int, args):
    """Greedy ``generate`` of exactly ``new_tokens`` tokens (random weights may emit eos at any time)."""
    with torch.no_grad(), precision_context(args.precision, args.device):
        return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)


def check_inference(template, folder: Path, batch: dict, args, plan: Plan) -> dict:
    """Float32: merged LoRA computes the unmerged one; deltactl's and PEFT's unmerged LoRA generate the same."""
    fp32 = argparse.Namespace(**{**vars(args), "precision": "fp32"})
    with exact_float32():
        model = fresh(template, args.device).eval()
        delta = attach_deltactl(model, "lora", args.seed)
        unmerged = logits_of(model, batch)
        ours = greedy(model, batch, plan.new_tokens, fp32)
        delta.merge()
        merged = logits_of(model, batch)
        peft_model = peft_from_folder(fresh(template, args.device), folder, args.device).eval()
        theirs = greedy(peft_model, batch, plan.new_tokens, fp32)
    scores, ref_scores = torch.stack(ours.scores), torch.stack(theirs.scores)
    finite = ref_scores.isfinite()  # min_new_tokens sets eos to -inf on both sides: compare the rest
    same_infinities = torch.equal(scores.isfinite(), finite)
    generate = verdict((scores - ref_scores)[finite].abs().max().item(), ref_scores[finite])
    generate["ok"] = generate["ok"] and same_infinities and torch.equal(ours.sequences, theirs.sequences)
    return {"merged_vs_unmerged": verdict((merged - unmerged).abs().max().item(), unmerged),
            "generate_deltactl_vs_peft": generate}


def measure_inference(template, folders: dict, args, plan: Plan) -> dict:
    size = plan.batches[plan.small_shape][0]
    batch = make_batch(template.config.vocab_size, size, plan.source_len, plan.target_len, args.device, args.seed + 1)
    checks = check_inference(template, folders["lora"], batch, args, plan)
    free(args.device)

    def forward_ms(model):
        def forward():
            with torch.no_grad(), precision_context(args.precision, args.device):
                model(**batch)
        return median_ms(forward, plan.steps, plan.warmup, args.device)

    def generate_ms(model):
        return median_ms(lambda: greedy(model, batch, plan.new_tokens, args), plan.steps, plan.warmup, args.device)

    model = cast(fresh(template, args.device), args.precision).eval()
    out = {"shape": plan.small_shape, "batch": size, "new_tokens": plan.new_tokens,
           "base_forward_ms": forward_ms(model), "base_generate_ms": generate_ms(model)}
    delta = attach_deltactl(model, "lora", args.seed)
    out["lora_unmerged_forward_ms"] = forward_ms(model)
    out["deltactl_generate_ms"] = generate_ms(model)
    delta.merge()
    out["lora_merged_forward_ms"] = forward_ms(model)
    del model, delta
    free(args.device)
    peft_model = cast(peft_from_folder(fresh(template, args.device), folders["lora"], args.device), args.precision)
    out["peft_generate_ms"] = generate_ms(peft_model.eval())
    del peft_model
    free(args.device)
    out["merged_over_base"] = out["lora_merged_forward_ms"] / out["base_forward_ms"]
    out["unmerged_over_base"] = out["lora_unmerged_forward_ms"] / out["base_forward_ms"]
    out["generate_deltactl_over_peft"] = out["deltactl_generate_ms"] / out["peft_generate_ms"]
    out["checks"] = checks
    return out


# ---- SAID: the projection's share of a step ------------------------------------------------------------------------


def check_said(template, batch: dict, args, plan: Plan) -> dict:
    """Float32: the model called through SAID equals a plain copy holding SAID's merged weights θ₀ + λ ⊙ P z."""
    with exact_float32():
        model = fresh(template, args.device).eval()
        sub = intrinsic(model, plan.said_d, said=True, seed=args.seed)
        with torch.no_grad():
            sub.z.normal_(0.0, 0.01)
        ours = logits_of(sub, batch)
        plain = fresh(template, args.device).eval()
        plain.load_state_dict(sub.merged(), strict=False)
        reference = logits_of(plain, batch)
    return {"against": "plain model with merged weights", **verdict((ours - reference).abs().max().item(), reference)}


def measure_said(template, args, plan: Plan) -> dict:
    size = plan.batches[plan.small_shape][0]
    batch = make_batch(template.config.vocab_size, size, plan.source_len, plan.target_len, args.device, args.seed + 1)
    check = check_said(template, batch, args, plan)
    free(args.device)
    sub = intrinsic(cast(fresh(template, args.device), args.precision).train(), plan.said_d, said=True, seed=args.seed)
    step = functools.partial(train_step, sub, batch, torch.optim.AdamW(sub.trainable().values(), lr=1e-3), args)

    # The projection alone, as it runs inside the step: P z split into the weights' offsets, then its backward
    # with an upstream gradient of the same shapes (what the step's backward hands it).
    upstream = [torch.randn(s, device=args.device, dtype=sub.z.dtype) for s in sub.shapes]

    def projection():
        with precision_context(args.precision, args.device):
            offsets = sub.offsets()
        torch.autograd.backward(offsets, [u.to(o.dtype) for u, o in zip(upstream, offsets)])
        sub.z.grad = sub.scales.grad = None

    with torch.no_grad(), precision_context(args.precision, args.device):
        projection_dtype = str(sub.offsets()[0].dtype)  # bf16 under autocast: the FWHT's matmuls autocast
    for _ in range(plan.warmup):
        step()
    memory = {}
    with peak_memory(args.device, memory):
        step_ms = median_ms(step, plan.steps, 0, args.device)
    projection_ms = median_ms(projection, plan.steps, plan.warmup, args.device)
    share = projection_ms / step_ms
    out = {"shape": plan.small_shape, "batch": size, "D": sub.D, "d": sub.d, "said_step_ms": step_ms,
           "projection_fwd_bwd_ms": projection_ms, "projection_dtype": projection_dtype, "projection_share": share,
           "goal_share": SAID_GOAL, "meets_goal": share <= SAID_GOAL,
           "peak_mib": memory["peak_mib"], "check": check}
    return out  # the caller frees the device memory once this frame's tensors are gone


# ---- report -------------------------------------------------------------------------------------------------------


def fmt(value, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def check_cell(check: dict | None) -> str:
    if check is None:
        return ""
    return f"{'OK' if check['ok'] else 'FAIL'} {check['max_abs_diff']:.1e}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def training_table(rows: list[dict], checks: list[dict]) -> str:
    by_method = {(c["shape"], c["method"]): c for c in checks}
    shapes = list(dict.fromkeys(r["shape"] for r in rows))  # in the order measured
    order = {side: i for i, side in enumerate(sides())}
    rows = sorted(rows, key=lambda r: (shapes.index(r["shape"]), r["batch"], order[(r["side"], r["method"])]))
    header = ["shape", "batch", "method", "side", "trainable", "ms/step", "peak MiB", "time ×PEFT", "mem ×PEFT",
              "time ×FT", "mem ×FT", "check (max abs diff)"]
    body = []
    for r in rows:
        check = by_method.get((r["shape"], r["method"])) if r["side"] == "deltactl" else None
        body.append([r["shape"], str(r["batch"]), r["method"], r["side"], f"{r['trainable']:,}",
                     fmt(r["ms_per_step"], ".2f"), fmt(r["peak_mib"], ",.0f"), fmt(r["time_vs_peft"]),
                     fmt(r["memory_vs_peft"]), fmt(r["time_vs_ft"]), fmt(r["memory_vs_ft"]), check_cell(check)])
    return markdown_table(header, body)


def memory_table(rows: list[dict]) -> str:
    body = [[r["method"], r["side"], fmt(r["peak_mib"], ",.0f"), fmt(r["saved_vs_ft"], ".1%")] for r in rows]
    return markdown_table(["method", "side", "peak MiB", "saved vs FT"], body)


def inference_table(inf: dict) -> str:
    c = inf["checks"]
    body = [
        ["forward, base model", fmt(inf["base_forward_ms"], ".2f"), "", ""],
        ["forward, deltactl LoRA unmerged", fmt(inf["lora_unmerged_forward_ms"], ".2f"),
         fmt(inf["unmerged_over_base"]) + " ×base", ""],
        ["forward, deltactl LoRA merged", fmt(inf["lora_merged_forward_ms"], ".2f"),
         fmt(inf["merged_over_base"]) + " ×base (goal 1.00)", check_cell(c["merged_vs_unmerged"]) + " vs unmerged"],
        ["generate, base model", fmt(inf["base_generate_ms"], ".2f"), "", ""],
        ["generate, deltactl LoRA unmerged", fmt(inf["deltactl_generate_ms"], ".2f"),
         fmt(inf["generate_deltactl_over_peft"]) + " ×PEFT", check_cell(c["generate_deltactl_vs_peft"]) + " vs PEFT"],
        ["generate, PEFT LoRA unmerged", fmt(inf["peft_generate_ms"], ".2f"), "", ""],
    ]
    return markdown_table(["latency", "ms", "ratio", "check (max abs diff)"], body)


def said_table(said: dict) -> str:
    verdict_word = "meets" if said["meets_goal"] else "MISSES"
    body = [[f"{said['D']:,}", str(said["d"]), fmt(said["said_step_ms"], ".2f"),
             fmt(said["projection_fwd_bwd_ms"], ".2f"), said["projection_dtype"].removeprefix("torch."),
             f"{said['projection_share']:.1%} ({verdict_word} ≤ {said['goal_share']:.0%})",
             fmt(said["peak_mib"], ",.0f"), check_cell(said["check"])]]
    return markdown_table(["D", "d", "SAID step ms", "projection fwd+bwd ms", "P z dtype", "share of step",
                           "peak MiB", "check (max abs diff)"], body)


def render(result: dict) -> str:
    env, s = result["environment"], result["settings"]
    inf, said = result["inference"], result["said"]
    parts = [
        f"# deltactl GPU check ({'tiny variant' if s['tiny'] else 'full'})",
        f"{env['device_name']}; torch {env['torch']}, transformers {env['transformers']}, PEFT {env['peft']}; "
        f"precision {s['precision']}; source {s['source_len']} / target {s['target_len']} tokens; median of "
        f"{s['steps']} steps after {s['warmup']} warm-up. Prefix: decoder self-attention only on both sides (PEFT's "
        "placement on T5). Peak memory: max_memory_allocated of one side alone (weights, optimizer state, "
        "activations); — where there is no CUDA.",
        "## Training step (forward + backward + AdamW)",
        training_table(result["training"], result["checks"]),
        f"## Memory saved against full fine-tuning, batch 1, {s['memory_shape']}",
        memory_table(result["memory_batch1"]),
        f"## Inference, {inf['shape']}, batch {inf['batch']}, {inf['new_tokens']} generated tokens",
        inference_table(inf),
        f"## SAID (Fastfood) over every weight, {said['shape']}, batch {said['batch']}",
        said_table(said),
        f"All correctness checks: {'OK' if result['all_checks_ok'] else 'FAIL'}",
    ]
    return "\n\n".join(parts) + "\n"


def all_checks(result: dict) -> list[dict]:
    inf = result["inference"]["checks"]
    return [*result["checks"], inf["merged_vs_unmerged"], inf["generate_deltactl_vs_peft"], result["said"]["check"]]


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename over ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- command line -----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: cuda when available, else cpu, which implies --tiny)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="folder for the JSON and markdown results (default: benchmarks/results)")
    ap.add_argument("--tiny", action="store_true", help="t5-tiny, batch 1 and 2, float32, a few steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 10, tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per measurement (default 3, tiny 1)")
    ap.add_argument("--precision", choices=("autocast", "bf16", "fp32"), default=None,
                    help="autocast: bf16 autocast over float32 weights (default on a GPU); bf16: bf16 weights; "
                         "fp32 (default for --tiny). Correctness checks always run in float32.")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def make_plan(args) -> Plan:
    plan = TINY if args.tiny else FULL
    overrides = {k: getattr(args, k) for k in ("steps", "warmup") if getattr(args, k) is not None}
    return Plan(**{**asdict(plan), **overrides})


def environment(args) -> dict:
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "device": args.device, "device_name": name}


def run(result: dict, args, plan: Plan) -> None:
    """Fill ``result`` section by section (what is done survives an exception, see ``main``)."""
    with tempfile.TemporaryDirectory() as adapters:
        folders = {m: Path(adapters) / m for m in WITH_PEFT}
        for shape in plan.batches:
            print(f"[{shape}] correctness checks, then {len(sides())} sides × batches {plan.batches[shape]}",
                  flush=True)
            template = build_template(shape, args.device, args.seed)
            result["checks"] += run_checks(shape, template, folders, args, plan)
            result["training"] += measure_training(shape, template, folders, args, plan)
            if shape == plan.small_shape:
                print(f"[{shape}] inference latency and SAID", flush=True)
                result["inference"] = measure_inference(template, folders, args, plan)
                result["said"] = measure_said(template, args, plan)
                free(args.device)
            del template
            free(args.device)
    add_ratios(result["training"])
    result["memory_batch1"] = memory_saved(result["training"], plan.memory_shape)
    result["all_checks_ok"] = all(c["ok"] for c in all_checks(result))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: the full table (T5-base and T5-large, bf16) needs CUDA; running the tiny CPU variant "
              "(t5-tiny, float32) of the same code instead")
        args.device = "cpu"
    if not args.device.startswith("cuda"):
        args.tiny = True  # T5-large on a CPU would take hours
    args.precision = args.precision or ("fp32" if args.tiny else "autocast")
    plan = make_plan(args)
    started, threads = time.perf_counter(), torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and one thread suffers less from contention
    stem = "gpu_check_tiny" if args.tiny else "gpu_check"
    result = {"environment": environment(args), "settings": {"tiny": args.tiny, "precision": args.precision,
                                                             "seed": args.seed, **asdict(plan)},
              "checks": [], "training": []}
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # PEFT and transformers warn about random-init models and task types
            run(result, args, plan)
    except Exception:
        # A GPU run is rare: keep what was measured before the failure, then fail loudly.
        result["error"] = traceback.format_exc()
        write_atomic(args.out / f"{stem}.partial.json", json.dumps(result, indent=1) + "\n")
        raise
    finally:
        torch.set_num_threads(threads)
    result["wall_s"] = time.perf_counter() - started
    markdown = render(result)
    write_atomic(args.out / f"{stem}.json", json.dumps(result, indent=1) + "\n")
    write_atomic(args.out / f"{stem}.md", markdown)
    (args.out / f"{stem}.partial.json").unlink(missing_ok=True)  # left by an earlier failed run
    print(markdown)
    print(f"wrote {args.out / stem}.json and .md in {result['wall_s']:.0f} s")
    return 0 if result["all_checks_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
