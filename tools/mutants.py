#!/usr/bin/env python3
"""A rerunnable mutation check: plant small, realistic one-line bugs in the library and see whether the tests fail.

Each mutant is (file, the exact original snippet, its replacement, the pytest arguments that should kill it). The
repository is copied once per job to a temporary folder (without .git); a mutant is written into that copy, the
named tests run there (``python3 -m pytest -x -q -p no:cacheprovider`` with a timeout), and the file is restored.
The working tree itself is never modified. A mutant is killed when its tests fail (or time out), survives when they
pass. A mutant known to be equivalent (no test can tell it apart) is marked with the reason and not run.

    python3 tools/mutants.py              # all mutants, one job
    python3 tools/mutants.py --list       # the list, with numbers
    python3 tools/mutants.py --only 3,17  # some of them
    python3 tools/mutants.py --baseline   # first check that every named selection passes on the unmutated copy

Exit status: 0 when every mutant that was run is killed; 1 on an unexplained survivor; 2 on a stale mutant (its
snippet no longer occurs exactly once in its file) or a selection that collects no test.
Standard library only.
"""

# ruff: noqa: E501 - the mutant table quotes library lines exactly, long ones included

from __future__ import annotations

import argparse
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]


@dataclass(frozen=True)
class Mutant:
    file: str
    old: str
    new: str
    tests: str  # pytest arguments (files, -k expression)
    what: str
    equivalent: str | None = None  # the reason no test can kill it


K = "tests/test_mutants_killed.py"
C = "tests/test_conformance.py"
L = "tests/test_train_loop.py"
M = "tests/test_merge_real_weights.py"
P = "tests/test_peft_crosscheck.py"
S = "tests/test_subspace.py"
SP = "tests/test_subspace_projections.py"
CNT = "tests/test_counts.py"
KM = "tests/test_mutants_killed_methods.py"

MUTANTS = [
    # ---- the survivors of the first mutation round (issue 21) -------------------------------------------------
    Mutant("deltactl/methods/prefix.py",
           "rows = self.site_rows(site).view(-1, 2, heads, head_dim)",
           "rows = self.site_rows(site)[: 0 if '.cross.' in site else None].view(-1, 2, heads, head_dim)",
           f"{K} -k cross_attention_prefix", "cross-attention prefix returns zero rows"),
    Mutant("deltactl/train/loop.py",
           "{kept}. {advice}\")\n                break\n",
           "{kept}. {advice}\")\n",
           f"{K} -k divergence", "a NaN optimiser step is applied before the trainer stops"),
    Mutant("deltactl/train/loop.py",
           "                status = \"diverged\"\n",
           "                status = \"diverged\"; save_best(out / \"best\")\n",
           f"{K} -k divergence", "divergence overwrites best/"),
    Mutant("deltactl/control/root.py",
           "for n, p in model.named_parameters() if not n.startswith(ROOT + \".\")]",
           "for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(ROOT + \".\")]",
           f"{K} -k tied", "tied tensors counted twice"),
    Mutant("deltactl/methods/prefix.py", "lo = self.offsets[site]", "lo = 0",
           f"{K} -k reparameterised", "reparameterised prefix gives the same rows at every site"),
    Mutant("deltactl/control/io.py", "merged = [d for d in deltas(model).values() if d.merged]", "merged = []",
           f"{K} -k saved_while_merged", "a delta saved while merged is refused on load"),
    Mutant("deltactl/methods/lora.py", "x if self.dropout is None else self.dropout(x)",
           "x if self.dropout is None else F.dropout(x, self.dropout.p, training=True)",
           f"{K} -k lora_dropout", "LoRA dropout active in eval mode"),
    Mutant("deltactl/train/loop.py", "on_main(lambda: _truncate_log(out / \"log.jsonl\", progress[\"step\"]))",
           "None", f"{K} -k resume_drops", "resume keeps duplicate rows in log.jsonl"),
    Mutant("deltactl/train/loop.py",
           "[{\"params\": decay, \"weight_decay\": config.weight_decay}, {\"params\": no_decay, \"weight_decay\": 0.0}]",
           "[{\"params\": no_decay, \"weight_decay\": config.weight_decay}, {\"params\": decay, \"weight_decay\": 0.0}]",
           f"{K} -k weight_decay", "AdamW weight-decay groups swapped"),
    Mutant("deltactl/methods/bitfit.py", "lambda b: self.bias.clone() if b is None else b + self.bias",
           "lambda b: self.bias.clone()", f"{M} -k bitfit", "BitFit merge replaces the bias"),
    Mutant("deltactl/control/io.py", "    for name, param in params:\n", "    for name, param in params[:-1]:\n",
           f"{K} -k fingerprint", "the base fingerprint ignores the last weight tensor"),
    Mutant("deltactl/inference/attacks.py", "best, trigger = value, trial", "best = value",
           f"{K} -k trigger_search", "the trigger search never takes a candidate"),
    Mutant("deltactl/train/loop.py", "        progress[\"bad_evals\"] += 1\n",
           "        progress[\"bad_evals\"] += 1\n        save_best(out / \"best\")\n",
           f"{K} -k best_is_written", "best/ rewritten at every evaluation"),
    # ---- control ---------------------------------------------------------------------------------------------
    Mutant("deltactl/control/accounting.py", "for p in model.parameters() if p.requires_grad)",
           "for p in model.parameters() if not p.requires_grad)", f"{K} -k tied", "trainable counts the frozen"),
    Mutant("deltactl/control/accounting.py", "100.0 * self.trainable / self.base",
           "100.0 * self.trainable / (self.base + self.trainable)", f"{K} -k tied", "share over base + δ"),
    Mutant("deltactl/control/combinators.py", "out = out + (part_out - y)", "out = out + part_out",
           f"{C} -k sum_adds", "sum adds outputs instead of controls"),
    Mutant("deltactl/control/combinators.py", "total = term if total is None else total + term",
           "total = term", f"{K} -k combination", "penalty keeps only the last part"),
    Mutant("deltactl/control/merge.py", "saved.append((module, attribute, old.detach().clone()))",
           "saved.append((module, attribute, old.detach()))", f"{C} -k merge_equals",
           "merge keeps an alias, not a copy, of the replaced weight"),
    Mutant("deltactl/control/merge.py", "module._parameters[attribute] = None  # as it was",
           "pass  # as it was", f"{C} -k \"merge_equals and t5 and bitfit\"", "unmerge leaves a created bias"),
    Mutant("deltactl/control/merge.py", "                old.copy_(new)\n", "                old.add_(new)\n",
           f"{C} -k merge_equals", "merge adds θ' to θ"),
    Mutant("deltactl/control/load.py", "if expected[\"sha256\"] != actual[\"sha256\"] and not",
           "if False and expected[\"sha256\"] != actual[\"sha256\"] and not", f"{C} -k save_load",
           "load accepts another base"),
    Mutant("deltactl/control/controller.py", "return self.layers[site_key(site)](*payload)",
           "return self.layers[site_key(site)](*payload[:1])", f"{KM} -k per_site_control",
           "per-site laws lose the layer output"),
    # ---- methods ---------------------------------------------------------------------------------------------
    Mutant("deltactl/methods/lora.py", "else cfg.alpha / cfg.r\n", "else cfg.alpha / cfg.r**0.5\n",
           f"{P} -k lora", "LoRA scale α/√r"),
    Mutant("deltactl/methods/lora.py", "return F.linear(F.linear(x, A), B) * scale",
           "return F.linear(F.linear(x, A), B)", f"{P} -k lora", "LoRA update without its scale"),
    Mutant("deltactl/methods/lora.py", "lambda W: W + self.delta_weight()",
           "lambda W: W + self.delta_weight() / self.scale", f"{C} -k \"merge_equals and lora\"", "LoRA merge without its scale"),
    Mutant("deltactl/methods/lora.py", "return sum(cfg.r * (s.dims[\"in\"] + s.dims[\"out\"]) for s in sites)",
           "return sum(cfg.r * s.dims[\"in\"] + s.dims[\"out\"] for s in sites)", f"{CNT} -k lora",
           "LoRA closed-form count"),
    Mutant("deltactl/methods/lora.py", "self.B = nn.Parameter(torch.zeros(d_out, cfg.r))",
           "self.B = nn.Parameter(torch.randn(d_out, cfg.r) * 1e-3)", f"{C} -k \"zero_control and lora\"",
           "LoRA B not zero at the start"),
    Mutant("deltactl/methods/bitfit.py", "return (y + self.bias).to(y.dtype)", "return (y - self.bias).to(y.dtype)",
           f"{M} -k nonzero_biases", "BitFit subtracts its bias"),
    Mutant("deltactl/methods/bitfit.py", "return site.dims[\"out\"] if site.kind == \"linear\" else site.dims[\"d\"]",
           "return site.dims[\"in\"] if site.kind == \"linear\" else site.dims[\"d\"]", f"{C} -k bitfit",
           "BitFit bias width from the input size"),
    Mutant("deltactl/methods/ia3.py", "(\"bias\", lambda b: None if b is None else b * self.l)",
           "(\"bias\", lambda b: None)", f"{M} -k \"nonzero_biases and ia3\"", "IA3 merge leaves the bias unscaled"),
    Mutant("deltactl/methods/ia3.py", "return [(\"weight\", lambda W: W * self.l)]",
           "return [(\"weight\", lambda W: W * self.l[:, None])]", f"{M} -k \"nonzero_biases and ia3\"",
           "IA3 input law scales rows"),
    Mutant("deltactl/methods/ia3.py", "self.l = nn.Parameter(torch.ones(d))", "self.l = nn.Parameter(torch.zeros(d))",
           f"{C} -k \"zero_control and ia3\"", "IA3 starts at 0, not 1"),
    Mutant("deltactl/methods/ia3.py", "z = x if self.acts_on == \"input\" else y", "z = y if y is not None else x",
           f"{KM} -k ia3", "IA3 scales the output where it should scale the input"),
    Mutant("deltactl/methods/adapter.py", "return (y + self.up(self.act(self.down(y.to(self.up.weight.dtype)))))",
           "return (self.up(self.act(self.down(y.to(self.up.weight.dtype)))))",
           f"{C} -k \"zero_control and adapter\"", "adapter loses its residual"),
    Mutant("deltactl/methods/adapter.py", "return sum(2 * s.dims[\"d\"] * cfg.r + s.dims[\"d\"] + cfg.r for s in sites)",
           "return sum(2 * s.dims[\"d\"] * cfg.r + s.dims[\"d\"] for s in sites)", f"{CNT} -k adapter",
           "adapter count without the down bias"),
    Mutant("deltactl/methods/prefix.py", "return cfg.length * d + (d * m + m) + (m * widths + widths)",
           "return cfg.length * d + d * m + (m * widths + widths)", f"{CNT} -k prefix",
           "prefix count without the MLP's first bias"),
    Mutant("deltactl/methods/prefix.py", ".view(-1, 2, heads, head_dim).permute(1, 2, 0, 3)",
           ".view(-1, heads, 2, head_dim).permute(2, 1, 0, 3)",
           f"{KM} {K} -k \"prefix_row or cross_attention_prefix\"",
           "prefix rows split into keys and values the wrong way"),
    Mutant("deltactl/methods/prefix.py", "hidden = torch.tanh(self.mlp_in(self.embedding))",
           "hidden = torch.relu(self.mlp_in(self.embedding))", f"{K} -k reparameterised",
           "prefix MLP with the wrong activation"),
    Mutant("deltactl/methods/prompt.py", "return sum(cfg.length * s.dims[\"d\"] for s in sites)",
           "return sum((cfg.length + 1) * s.dims[\"d\"] for s in sites)", f"{CNT} -k prompt", "prompt count"),
    Mutant("deltactl/methods/diff_pruning.py", "return 2 * sum(math.prod(s.dims[\"shape\"]) for s in sites)",
           "return sum(math.prod(s.dims[\"shape\"]) for s in sites)", f"{CNT} -k diff", "diff-pruning count"),
    Mutant("deltactl/methods/mask.py", "return (theta * self.mask()).to(theta.dtype)",
           "return (theta * (1 - self.mask())).to(theta.dtype)", f"{C} -k \"zero_control and mask\"",
           "mask keeps the dropped weights"),
    Mutant("deltactl/methods/ia3.py", "return sum(s.dims[\"in\" if _on_input(cfg, s) else \"out\"] for s in sites)",
           "return sum(s.dims[\"out\" if _on_input(cfg, s) else \"in\"] for s in sites)",
           f"{C} -k \"only_delta_trains and ia3\"", "IA3 count swaps input and output widths"),
    # ---- train -----------------------------------------------------------------------------------------------
    Mutant("deltactl/train/loop.py", "schedule = lambda s: min((s + 1) / warm,", "schedule = lambda s: min(s / warm,",
           f"{K} -k weight_decay", "the first step has learning rate 0"),
    Mutant("deltactl/train/loop.py", "steps_per_epoch = math.ceil(len(train_set) / config.batch_size)",
           "steps_per_epoch = len(train_set) // config.batch_size", f"{L} -k resume",
           "the last partial batch is dropped from the step count"),
    Mutant("deltactl/train/loop.py", "            if config.max_grad_norm:\n", "            if True:\n",
           f"{K} -k weight_decay", "gradients clipped with max_grad_norm = 0"),
    Mutant("deltactl/train/loop.py", "optimizer.zero_grad(set_to_none=True)", "pass",
           f"{L} -k resume", "gradients accumulate across steps"),
    Mutant("deltactl/train/loop.py", "if config.patience and progress[\"bad_evals\"] >= config.patience:",
           "if config.patience and progress[\"bad_evals\"] > config.patience:", f"{L} -k early",
           "early stopping one evaluation late"),
    Mutant("deltactl/train/loop.py", "return accelerator.skip_first_batches(loader, skip) if skip else loader",
           "return loader", f"{L} -k resume", "resume restarts the epoch"),
    Mutant("deltactl/train/loop.py", "kept = [e for e in read_log(path) if e[\"step\"] <= step]",
           "kept = [e for e in read_log(path) if e[\"step\"] < step]",
           f"{K} -k resume_drops", "resume drops the checkpoint's own evaluation"),
    Mutant("deltactl/train/checkpoint.py", "    torch.set_rng_state(tensors.get(f\"rng/torch/{rank}\", tensors[\"rng/torch\"]))\n",
           "    pass\n",
           f"{L} -k resume", "the RNG state is not restored"),
    Mutant("deltactl/train/checkpoint.py", "    scheduler.load_state_dict(meta[\"scheduler\"])\n", "    pass\n",
           f"{L} -k resume", "the schedule restarts on resume"),
    Mutant("deltactl/train/checkpoint.py", "            param.copy_(tensors[f\"param/{name}\"])\n", "            pass\n",
           f"{L} -k resume", "δ is not restored on resume"),
    Mutant("deltactl/train/checkpoint.py", "    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta[\"optimizer\"]))\n",
           "    pass\n", f"{L} -k resume", "the optimiser state is not restored"),
    Mutant("deltactl/train/loop.py", "if step % config.eval_every == 0 or step == total:",
           "if step % config.eval_every == 0:", f"{L} -k resume", "no evaluation at the last step"),
    Mutant("deltactl/train/loop.py", "improved = progress[\"best_metric\"] is None or value > progress[\"best_metric\"]",
           "improved = progress[\"best_metric\"] is None or value < progress[\"best_metric\"]",
           f"{K} -k best_is_written", "best means lowest metric"),
    # ---- subspace --------------------------------------------------------------------------------------------
    Mutant("deltactl/subspace/fwht.py", "b.mul_(-2).add_(a)", "b.mul_(-1).add_(a)", f"{SP} -k kernels",
           "butterfly computes b − a"),
    Mutant("deltactl/subspace/fwht.py", "torch.cat([h, -h], 1)", "torch.cat([h, h], 1)", f"{SP} -k hadamard",
           "Hadamard matrix without its sign"),
    Mutant("deltactl/subspace/fwht.py", "return _FWHT.apply(grad, ctx.kernel), None",
           "return _FWHT.apply(grad, ctx.kernel) / grad.shape[-1], None", f"{SP} -k gradients",
           "FWHT gradient scaled by 1/n (the known trap)"),
    Mutant("deltactl/subspace/fwht.py", "return _FWHT.apply(tangent, ctx.kernel)", "return tangent",
           f"{SP} -k torch_func", "FWHT forward-mode derivative is the identity"),
    Mutant("deltactl/subspace/fwht.py", "        done *= r\n", "        done *= 2\n", f"{SP} -k kernels",
           "radix stages advance by 2"),
    Mutant("deltactl/subspace/projections.py", "self.P /= self.P.norm(dim=0, keepdim=True)",
           "self.P /= self.P.norm(dim=1, keepdim=True)", f"{SP} -k unit_columns", "dense rows normalised, not columns"),
    Mutant("deltactl/subspace/projections.py", "values /= norms[cols]", "values /= norms[cols] ** 0.5",
           f"{SP} -k unit_columns", "sparse columns not unit norm"),
    Mutant("deltactl/subspace/projections.py", "return _Permute.apply(grad, ctx.inverse, ctx.perm), None, None",
           "return _Permute.apply(grad, ctx.perm, ctx.inverse), None, None", f"{SP} -k fastfood_equals",
           "permutation backward uses the forward permutation"),
    Mutant("deltactl/subspace/intrinsic.py", "return {n: self.base[n] + off for n, off in zip(self.names, self.offsets())}",
           "return {n: off for n, off in zip(self.names, self.offsets())}", f"{S} -k zero_z",
           "subspace weights forget θ₀"),
    Mutant("deltactl/subspace/intrinsic.py", "return [s * p.view(shape) for s, p, shape in zip(self.scales, pieces, self.shapes)]",
           "return [p.view(shape) for s, p, shape in zip(self.scales, pieces, self.shapes)]",
           f"{S} -k \"only_z or base_plus\"", "SAID ignores its scales"),
    Mutant("deltactl/subspace/d90.py", "hit = next((i for i, m in enumerate(metrics) if m >= target), None)",
           "hit = next((i for i, m in enumerate(metrics) if m > target), None)", f"{S} -k d90",
           "d90 needs to exceed 90%, not reach it"),
    Mutant("deltactl/subspace/d90.py", "interpolated = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))",
           "interpolated = d0 + t * (d1 - d0)", f"{S} -k d90", "d90 interpolated linearly, not in log d"),
    # ---- theory ----------------------------------------------------------------------------------------------
    Mutant("deltactl/theory/msa.py", "return {k: controls[k].detach() + total[k] / proximal for k in controls}",
           "return {k: controls[k].detach() - total[k] / proximal for k in controls}",
           "tests/test_theory_tools.py -k linearised", "linearised MSA step goes uphill"),
    Mutant("deltactl/theory/msa.py", "            total[k] = total[k] + g\n", "            total[k] = g\n",
           "tests/test_theory_tools.py -k linearised", "linearised step keeps one stage's gradient"),
    Mutant("deltactl/theory/msa.py", "total = total - 0.5 * proximal * sum(",
           "total = total + 0.5 * proximal * sum(", "tests/test_theory_tools.py -k \"emsa or proximal_term\"",
           "proximal term rewards distance"),
    Mutant("deltactl/theory/lq.py", "P = Q + A.T @ P @ (A - B @ K)", "P = Q + A.T @ P @ A",
           "tests/test_theory_pontryagin.py -k riccati", "Riccati recursion without the gain"),
    Mutant("deltactl/theory/lq.py", "controls[f\"u{t}\"] = -K @ x", "controls[f\"u{t}\"] = K @ x",
           "tests/test_theory_pontryagin.py -k riccati", "LQ feedback with the wrong sign"),
    Mutant("deltactl/theory/geometry.py", "cos = torch.linalg.svdvals(Ua.T @ Ub).clamp(0.0, 1.0)",
           "cos = torch.linalg.svdvals(Ua.T @ Ub).clamp(0.0, 1.0).flip(0)",
           "tests/test_theory_tools.py -k principal_angles", "angles unsorted",
           equivalent="principal_angles sorts the angles after arccos, so reversing the cosines first changes nothing"),
    Mutant("deltactl/theory/geometry.py", "    return U[:, :rank]\n", "    return U[:, : rank + 1]\n",
           "tests/test_theory_tools.py -k \"principal_angles or tangent\"", "column basis one column too wide"),
    Mutant("deltactl/theory/reachability.py", "return int((values > rtol * values[0]).sum())",
           "return int((values > rtol).sum())",
           "tests/test_theory_tools.py -k \"numerical_rank or low_rank or tangent or effective\"",
           "numerical rank with an absolute tolerance"),
    Mutant("deltactl/theory/reachability.py", "return 1e-6 if dtype == torch.float64 else 1e-3",
           "return 1e-1 if dtype == torch.float64 else 1e-3",
           "tests/test_theory_tools.py -k \"low_rank or tangent or effective\"", "rank tolerance far too loose"),
    # ---- backbones -------------------------------------------------------------------------------------------
    Mutant("deltactl/backbones/t5.py", "memory = torch.arange(n_mem, device=query.device)[None, :] - n_mem",
           "memory = torch.arange(n_mem, device=query.device)[None, :]", f"{P} -k \"prefix_matches_peft\"",
           "memory rows placed after the first token"),
    Mutant("deltactl/backbones/t5.py", "bidirectional=not source.is_decoder)", "bidirectional=True)",
           f"{P} -k \"prefix_matches_peft\"", "decoder memory bias bidirectional"),
    Mutant("deltactl/backbones/memory.py", "visible = True if mask.dtype == torch.bool else 0.0",
           "visible = True if mask.dtype == torch.bool else -1.0",
           "tests/test_t5_backbone.py tests/test_bert_backbone.py -k concatenated_keys", "memory columns down-weighted"),
    Mutant("deltactl/backbones/memory.py", "key, value = torch.cat([mem_k, key], dim=2), torch.cat([mem_v, value], dim=2)",
           "key, value = torch.cat([mem_k, key], dim=2), torch.cat([mem_k, value], dim=2)",
           "tests/test_t5_backbone.py tests/test_bert_backbone.py -k concatenated_keys", "memory values are its keys"),
    Mutant("deltactl/backbones/memory.py", "return torch.cat([pad, mask], dim=-1)", "return torch.cat([mask, pad], dim=-1)",
           "tests/test_t5_backbone.py tests/test_bert_backbone.py -k concatenated_keys",
           "memory mask columns in the wrong place"),
    Mutant("deltactl/backbones/bert.py", "kwargs[\"attention_mask\"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)",
           "kwargs[\"attention_mask\"] = torch.cat([mask.new_zeros(batch, p), mask], dim=1)",
           "tests/test_bert_backbone.py -k prompt_rows", "BERT prompt rows masked out"),
    Mutant("deltactl/backbones/bert.py", "kwargs[\"position_ids\"] = torch.cat([first, pos + p], dim=1)",
           "kwargs[\"position_ids\"] = torch.cat([first, pos], dim=1)", "tests/test_bert_backbone.py -k prompt",
           "BERT prompt: token positions not shifted"),
    Mutant("deltactl/control/load.py", "if tuple(value.shape) != tuple(own[key].shape):", "if False:",
           "tests/test_faults.py -k unverified", "load leaves a shape mismatch to torch's message"),
    Mutant("deltactl/train/checkpoint.py", "if tensor_digest(tensors) != meta[\"tensors_sha256\"]:", "if False:",
           "tests/test_faults.py -k changed_checkpoint", "checkpoint tensors not checked against their hash"),
    Mutant("deltactl/control/attach.py", "        restore_weights(self._merged)\n", "",
           f"{C} -k merge_equals", "unmerge forgets to restore the weights"),
    Mutant("deltactl/control/rows.py",
           "return (rows_here[:, None] * copies + torch.arange(copies, device=value.device)[None, :]).reshape(-1)",
           "return (rows_here[:, None] + torch.arange(copies, device=value.device)[None, :] * batch).reshape(-1)",
           "tests/test_per_row.py", "per-row copies of a row taken as tiled, not interleaved (beam search)"),
    Mutant("deltactl/control/rows.py", "return y.index_copy(0, index, law(part_x, y.index_select(0, index)))",
           "return law(x, y)", "tests/test_per_row.py", "per-row law applied to every row"),
    Mutant("deltactl/control/rows.py", "return x.index_copy(0, index, law(x.index_select(0, index)))",
           "return law(x)", "tests/test_per_row.py", "per-row input law applied to every row"),
    Mutant("deltactl/methods/arithmetic.py", "torch.cat([w * lay.scale * lay.A.detach()",
           "torch.cat([w * lay.A.detach()", "tests/test_arithmetic.py", "LoRA cat forgets each delta's scale"),
    Mutant("deltactl/methods/arithmetic.py", "base + sum(w * (s[key] - base) for w, s in zip(weights, states))",
           "sum(w * s[key] for w, s in zip(weights, states))", "tests/test_arithmetic.py",
           "linear combination ignores the identity control (IA3's 1)"),
    Mutant("deltactl/methods/arithmetic.py", "U[:, :r] * S[:r]", "U[:, :r]", "tests/test_arithmetic.py",
           "SVD combination drops the singular values"),
    Mutant("deltactl/methods/arithmetic.py", "math.copysign(math.sqrt(abs(ws)), ws)", "math.sqrt(abs(ws))",
           "tests/test_arithmetic.py", "LoRA linear loses a negative weight's sign"),
    Mutant("deltactl/inference/manifold.py", "last = mask.shape[1] - 1 - mask.flip(1).argmax(1)",
           "last = mask.sum(1) - 1", "tests/test_robust_prefix_gpt2.py", "last readout wrong on left padding"),
    Mutant("deltactl/backbones/llama.py", "if site.kind == \"memory\" and self.windowed():",
           "if False:", "tests/test_llama_family.py -k sliding", "prefix rows allowed under a sliding window"),
    Mutant("deltactl/train/models.py", "logits = logits[:, -labels.shape[1]:]", "logits = logits[:, :labels.shape[1]]",
           "tests/test_causal_lm_train.py", "causal LM scores read the prompt's rows instead of the tokens'"),
    Mutant("deltactl/train/loop.py", "            with computing():\n                loss = loss_fn(model, batch)",
           "            with computing(), accelerator.no_sync(model):\n                loss = loss_fn(model, batch)",
           "tests/test_distributed.py -k keep_the_delta", "processes train on their shares without exchanging gradients"),
    Mutant("deltactl/train/loop.py", "enabled=config.mixed_precision == \"bf16\"", "enabled=False",
           "tests/test_distributed.py -k bf16", "--mixed-precision bf16 computes in float32"),
    Mutant("deltactl/experiments/protocol.py", "if not str(protocol.get(\"why\", \"\")).strip():", "if False:",
           "tests/test_protocol.py", "a study may declare it has no data without saying why"),
    Mutant("deltactl/experiments/protocol.py", "if seeds < MIN_SEEDS:", "if seeds < 1:",
           "tests/test_protocol.py", "a verdict on two seeds passes the protocol check"),
    Mutant("deltactl/experiments/kshot.py", "clean = [e for e in test if pr.example_key(e) not in seen]",
           "clean = list(test)", "tests/test_kshot.py", "report sentences that a 16-shot file holds stay in the report"),
    Mutant("deltactl/experiments/kshot.py", "fcntl.flock(handle, fcntl.LOCK_EX)", "fcntl.flock(handle, fcntl.LOCK_SH)",
           "tests/test_kshot.py", "two processes train the same shared run at once"),
    Mutant("experiments/performance/run.py", "values += [best] * (cfg[\"curve_evals\"] - len(values))",
           "values += [0.0] * (cfg[\"curve_evals\"] - len(values))", "tests/test_protocol_studies.py",
           "an early-stopped run's convergence drops to 0 after it stops"),
    Mutant("experiments/generalisation_gap/run.py", "difference = pr.paired_summary(ft, delta)",
           "difference = pr.paired_summary(delta, ft)", "tests/test_protocol_studies.py",
           "the gap claims read gap(δ) − gap(FT)"),
    Mutant("experiments/scale/run.py", "[a - b for a, b in zip(gap_small, gap_large)]",
           "[b - a for a, b in zip(gap_small, gap_large)]", "tests/test_protocol_studies.py",
           "the scale claims read the gap at the largest depth minus the smallest"),
    Mutant("deltactl/experiments/kshot.py", '"delta": file_digest(Path(after) / "best" / BEST)}', '"delta": None}',
           "tests/test_experiment_combinations.py", "a sequential stage's cache ignores a retrained earlier δ"),
    Mutant("deltactl/experiments/kshot.py", "model=model,\n                        after=after)", "model=model)",
           "tests/test_experiment_combinations.py", "a sequential stage trains without its earlier stage attached"),
    Mutant("experiments/combinations/run.py", "chosen = max(singles, key=lambda r: (kshot.selection_score(r), -singles.index(r)))",
           "chosen = max(singles, key=lambda r: r[\"report_accuracy\"])", "tests/test_experiment_combinations.py",
           "the best single method is chosen on the report split"),
    Mutant("experiments/combinations/run.py", 'verdict = "agrees" if 0 < helped < len(chains) else "disagrees"',
           'verdict = "agrees" if helped > 0 else "disagrees"', "tests/test_experiment_combinations.py",
           "the sequential reading agrees when every order helps"),
    Mutant("experiments/efficiency/run.py", "unread.append(", "(", "tests/test_protocol_studies.py",
           "efficiency drops an unreadable claim without saying so"),
    Mutant("experiments/performance/run.py", 'runs = [r for r in stored["runs"] if r["seed"] in seeds]',
           'runs = list(stored["runs"])', "tests/test_protocol_studies.py",
           "--keep-runs keeps seeds that were not asked for"),
    Mutant("experiments/combinations/run.py", 'after = Path(row["folder"])', "pass",
           "tests/test_experiment_combinations.py -k continues", "every sequential stage trains on the first stage alone"),
    Mutant("experiments/combinations/run.py", 'single[order[k]]["lr"]', 'single[order[0]]["lr"]',
           "tests/test_experiment_combinations.py -k continues", "a stage trains at the first stage's lr, not its own method's"),
    Mutant("deltactl/train/loop.py", "return value > BLOW_UP * median and value - median > BLOW_UP_RISE",
           "return value > BLOW_UP * median", "tests/test_faults.py -k wandering",
           "a fitted run's loss wandering near zero is stopped as diverged"),
]


def _check(mutants) -> list[str]:
    """Mutants whose snippet does not occur exactly once in their file."""
    bad = []
    for i, m in mutants:
        text = (ROOT / m.file).read_text()
        n = text.count(m.old)
        if n != 1:
            bad.append(f"#{i} {m.file}: snippet found {n} times: {m.old!r}")
    return bad


def _copy() -> Path:
    target = Path(tempfile.mkdtemp(prefix="deltactl-mutants-")) / "repo"
    shutil.copytree(ROOT, target, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "*.egg-info"))
    return target


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # The copy lives elsewhere, where ../shared/data does not resolve: point it at this checkout's data, so tests
    # on the real tasks run in the copy instead of skipping (a skipped test kills nothing).
    shared = ROOT.parent / "shared" / "data"
    if "DELTACTL_DATA" not in env and shared.is_dir():
        env["DELTACTL_DATA"] = str(shared)
    return env


def _pytest(copy: Path, tests: str, timeout: float) -> tuple[int | None, str]:
    import shlex

    try:
        done = subprocess.run(PYTEST + shlex.split(tests), cwd=copy, env=_env(copy), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return done.returncode, lines[-1] if lines else ""


def _verify_copy(copy: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import deltactl; print(deltactl.__file__)"], cwd=copy,
                         env=_env(copy), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy imports deltactl from {out}, not from {copy}: mutants would not be seen")


def _run_one(copy: Path, i: int, m: Mutant, timeout: float) -> tuple[str, str, float]:
    path = copy / m.file
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new, 1))
    start = time.perf_counter()
    try:
        rc, last = _pytest(copy, m.tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - start
    if rc is None:
        return "killed", "timeout", seconds
    if rc == 0:
        return "survived", last, seconds
    if rc == 5:
        return "error", f"no test collected by {m.tests!r}", seconds
    return "killed", last if rc == 1 else f"pytest exit {rc}: {last}", seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated mutant numbers (see --list)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--jobs", type=int, default=1, help="parallel copies of the repository (default 1)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's tests (default 900)")
    parser.add_argument("--baseline", action="store_true", help="first run every selection on the unmutated copy")
    args = parser.parse_args(argv)

    chosen = list(enumerate(MUTANTS, 1))
    if args.only:
        wanted = {int(x) for x in args.only.split(",") if x.strip()}
        chosen = [(i, m) for i, m in chosen if i in wanted]
    if args.list:
        for i, m in chosen:
            mark = f"  [equivalent: {m.equivalent}]" if m.equivalent else ""
            print(f"{i:3d}  {m.file}: {m.what}  ->  {m.tests}{mark}")
        return 0
    stale = _check(chosen)
    if stale:
        print("stale mutants (fix the list):\n  " + "\n  ".join(stale))
        return 2

    started = time.perf_counter()
    copies = [_copy() for _ in range(max(1, args.jobs))]
    try:
        _verify_copy(copies[0])
        if args.baseline:
            for tests in dict.fromkeys(m.tests for _, m in chosen if not m.equivalent):
                rc, last = _pytest(copies[0], tests, args.timeout)
                if rc != 0:
                    print(f"baseline fails for {tests!r}: {last}")
                    return 2
            print("baseline: every selection passes on the unmutated copy")
        pool: queue.Queue = queue.Queue()
        for c in copies:
            pool.put(c)
        results: dict[int, tuple[str, str, float]] = {}
        lock = threading.Lock()

        def work(i, m):
            if m.equivalent:
                results[i] = ("equivalent", m.equivalent, 0.0)
            else:
                copy = pool.get()
                try:
                    results[i] = _run_one(copy, i, m, args.timeout)
                finally:
                    pool.put(copy)
            with lock:
                status, detail, seconds = results[i]
                print(f"#{i:3d} {status:10s} {seconds:6.1f}s  {m.file}: {m.what}"
                      + (f"  ({detail})" if status != "killed" else ""), flush=True)

        threads = []
        sem = threading.Semaphore(len(copies))

        def guarded(i, m):
            with sem:
                work(i, m)

        for i, m in chosen:
            t = threading.Thread(target=guarded, args=(i, m))
            t.start()
            threads.append(t)
            if len(copies) == 1:
                t.join()
        for t in threads:
            t.join()
    finally:
        for c in copies:
            shutil.rmtree(c.parent, ignore_errors=True)

    by = {s: [i for i in results if results[i][0] == s] for s in ("killed", "survived", "equivalent", "error")}
    print(f"\n{len(chosen)} mutants: {len(by['killed'])} killed, {len(by['survived'])} surviving, "
          f"{len(by['equivalent'])} equivalent, {len(by['error'])} errors "
          f"({time.perf_counter() - started:.0f} s)")
    for i in by["survived"]:
        print(f"  surviving #{i}: {MUTANTS[i - 1].file}: {MUTANTS[i - 1].what}")
    for i in by["equivalent"]:
        print(f"  equivalent #{i}: {MUTANTS[i - 1].what}: {MUTANTS[i - 1].equivalent}")
    for i in by["error"]:
        print(f"  error #{i}: {results[i][1]}")
    if by["error"]:
        return 2
    return 1 if by["survived"] else 0


if __name__ == "__main__":
    sys.exit(main())
