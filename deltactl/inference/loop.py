"""The generic inference-time loop: optimise the free part of δ for one batch against a state cost, then restore.

Training a delta solves min_δ E[ℓ(h⁽ᴸ⁾, y)] over a data set. At inference there is no label, but a *state cost*
c(h⁽⁰⁾…h⁽ᴸ⁾, output) can still be minimised for the batch at hand,

    δ* = argmin_δ  c(trajectory(x; δ)),     δ initialised at the trained value,

with a few Adam steps (the open-loop control problem of Yang & Liu, ICLR 2022, §5, solved per test batch).
The outputs are then computed under δ*, and δ is put back bit for bit: the next batch starts from the trained
controller again. Frozen base weights are never handed to the optimiser, so they are untouched.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from deltactl.backbones.base import Trajectory
from deltactl.control.attach import Delta


@dataclass
class InferenceResult:
    """What ``optimize`` returns: the outputs under the optimised δ and the cost before each step."""

    outputs: object
    costs: list[float] = field(default_factory=list)


def free_parameters(delta: Delta, free=None) -> list[torch.Tensor]:
    """The tensors the loop may change: all of δ (None), δ's parameters whose names match glob patterns, or tensors.

    Args:
        delta: the attached controller.
        free: None; a pattern or list of patterns over ``delta.named_parameters()`` names
            (e.g. ``"layers.decoder__5__*"``); or a list of tensors (leaves; they need not belong to δ).
    """
    if free is None:
        return list(delta.parameters())
    if isinstance(free, str):
        free = [free]
    free = list(free)
    if all(isinstance(f, torch.Tensor) for f in free):
        bad = [i for i, t in enumerate(free) if not (t.is_leaf and t.is_floating_point())]
        if bad:
            raise ValueError(f"free tensors must be floating-point leaves; entry {bad[0]} is not")
        return free
    if not all(isinstance(f, str) for f in free):
        raise TypeError("free must be None, glob patterns over δ's parameter names, or a list of tensors")
    named = dict(delta.named_parameters())
    chosen = []
    for pattern in free:
        hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"free pattern {pattern!r} matches none of δ's parameters; they are named like "
                f"{', '.join(list(named)[:4])}"
            )
        chosen += [named[n] for n in hits if all(named[n] is not c for c in chosen)]
    return chosen


@contextmanager
def preserved(tensors: Iterable[torch.Tensor]):
    """Within the block the tensors may change (and carry gradients); at exit values, grads and flags are restored.

    The values are copied back from clones taken at entry, so they are bitwise what they were.
    """
    tensors = list(tensors)
    saved = [(t.detach().clone(), t.requires_grad, t.grad) for t in tensors]
    try:
        for t in tensors:
            t.grad = None
            t.requires_grad_(True)
        yield tensors
    finally:
        with torch.no_grad():
            for t, (value, flag, grad) in zip(tensors, saved):
                t.copy_(value)
                t.requires_grad_(flag)
                t.grad = grad


def descend(cost_of: Callable[[], torch.Tensor], params: list[torch.Tensor], steps: int, lr: float,
            optimizer: str = "adam") -> list[float]:
    """``steps`` optimiser steps on ``cost_of()`` w.r.t. ``params`` (in place); the cost before each step.

    Adam (the papers' choice) or plain SGD; lr = 0 leaves the parameters bitwise unchanged.
    """
    if steps < 0 or lr < 0:
        raise ValueError(f"steps and lr must be ≥ 0, got steps={steps}, lr={lr}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=lr)
    costs = []
    for _ in range(steps):
        with torch.enable_grad():
            cost = cost_of()
            if cost.ndim != 0:
                raise ValueError(f"the cost must be a scalar; it has shape {tuple(cost.shape)}")
            # Gradients of the free tensors only: nothing else accumulates a .grad, and no other path is walked.
            grads = torch.autograd.grad(cost, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g
        costs.append(cost.item())
        opt.step()
    opt.zero_grad(set_to_none=True)
    return costs


def optimize(
    delta: Delta,
    cost: Callable[[Trajectory], torch.Tensor],
    inputs: dict,
    *,
    steps: int,
    lr: float,
    free=None,
    rollout: Callable[..., Trajectory] | None = None,
    forward: Callable[..., object] | None = None,
    optimizer: str = "adam",
) -> InferenceResult:
    """Optimise the free part of δ for this batch against ``cost``; return the outputs; restore δ exactly.

    Args:
        delta: an attached controller (its trained value is the starting point).
        cost: ``cost(trajectory) -> scalar``; the trajectory has ``states[stack][j]`` = h⁽ʲ⁾ and ``output``.
        inputs: the batch, keyword arguments of the backbone model (or of ``rollout``/``forward``).
        steps, lr: optimiser steps and learning rate.
        free: which δ move (see ``free_parameters``); default all of δ.
        rollout: ``rollout(**inputs) -> Trajectory`` (default ``delta.backbone.rollout``, the full trajectory);
            pass a truncated rollout when the cost needs only the bottom states.
        forward: ``forward(**inputs)``, the outputs returned under the optimised δ (default the backbone model).
        optimizer: "adam" or "sgd".

    Returns:
        InferenceResult(outputs, costs): costs[i] is the cost before step i (costs[0] at the trained δ).

    Example:
        >>> cost = lambda t: t["encoder"][-1].pow(2).mean()
        >>> result = optimize(delta, cost, batch, steps=3, lr=1e-2)  # doctest: +SKIP
    """
    rollout = rollout or delta.backbone.rollout
    forward = forward or delta.backbone.model
    params = free_parameters(delta, free)

    def cost_of():
        return cost(rollout(**inputs))

    with preserved(params):
        costs = descend(cost_of, params, steps, lr, optimizer)
        with torch.no_grad():
            outputs = forward(**inputs)
    return InferenceResult(outputs, costs)
