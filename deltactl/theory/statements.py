"""The theory statements checked numerically: one entry per proposition of the top-level ``theory/`` folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltactl.theory import checks_dynamics as dyn
from deltactl.theory import checks_structure as struct


@dataclass(frozen=True)
class Statement:
    """A proposition (``theory/<name>.md``), the model it is checked on, and the tolerance of its measured error."""

    name: str
    claim: str
    model: str
    tolerance: float
    check: Callable[[], tuple[float, str]]


@dataclass(frozen=True)
class Result:
    statement: Statement
    error: float
    detail: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.error <= self.statement.tolerance


STATEMENTS = {s.name: s for s in [
    Statement("costates", "costates p⁽ʲ⁾ = −∂J/∂h⁽ʲ⁾ and ∇_δ J = −Σ_j ∇_δ H_j (every method)",
              "tiny T5 + tiny BERT, float64, eager and SDPA", 1e-10, dyn.costates_equal_autograd),
    Statement("msa-gradient-step", "the linearised proximal MSA step is a gradient-descent step (every method)",
              "tiny T5 + tiny BERT, float64, eager and SDPA", 1e-10,
              dyn.msa_linearised_step_is_gradient_descent),
    Statement("msa-riccati", "MSA reaches the Riccati optimum of a linear-quadratic problem",
              "LQ (n = 4, m = 2, T = 8), float64", 1e-8, dyn.msa_reaches_riccati_optimum),
    Statement("prefix-gated-attention", "prefix attention = (1 − λ)·attention(tokens) + λ·attention(prefix)",
              "t5-small shape, float32", 1e-5, struct.prefix_is_gated_attention),
    Statement("lora-rank-merge", "LoRA's ΔW has rank ≤ r, and merged weights = unmerged delta",
              "t5-small shape, float32", 1e-5, struct.lora_rank_and_merge),
    Statement("zero-control", "zero control is the pre-trained model (every registered method)",
              "t5-small shape, float32", 1e-6, struct.zero_control_is_identity),
    Statement("did-affine", "a DID subspace reaches an affine set of dimension ≤ d",
              "tiny T5, float64", 1e-10, struct.did_reachable_set_is_affine),
    Statement("lora-tangent", "LoRA's tangent space has dimension r(d_in + d_out) − r²",
              "tiny T5, float64", 0.0, struct.lora_tangent_dimension),
]}


def run(names=None) -> list[Result]:
    """Run the named statements (all by default), one thread, in the order of ``STATEMENTS``."""
    names = list(STATEMENTS) if not names else list(names)
    unknown = [n for n in names if n not in STATEMENTS]
    if unknown:
        raise ValueError(f"unknown statement {unknown[0]!r}; known: {', '.join(STATEMENTS)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is several times faster than contended ones
    results = []
    try:
        for name in names:
            statement = STATEMENTS[name]
            start = time.perf_counter()
            try:
                error, detail = statement.check()
            except Exception as err:  # a statement that cannot be evaluated fails, with the reason shown
                error, detail = float("inf"), f"error: {type(err).__name__}: {err}"
            results.append(Result(statement, error, detail, time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return results


def table(results: list[Result], details: bool = True) -> str:
    """A plain-text table: statement, measured error, tolerance, pass/fail (and what was measured)."""
    rows = [("statement", "claim", "error", "tolerance", "result", "time")]
    for r in results:
        rows.append((r.statement.name, r.statement.claim, f"{r.error:.1e}", f"{r.statement.tolerance:.0e}",
                     "pass" if r.passed else "FAIL", f"{r.seconds:.1f} s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if details:
        lines.append("")
        lines += [f"{r.statement.name}: {r.detail} [{r.statement.model}]" for r in results]
    return "\n".join(lines)
