"""Truncated rollout: the first n states h⁽⁰⁾…h⁽ⁿ⁻¹⁾ of one stack, running only the blocks that produce them.

A cost on the bottom n states of a stack depends on blocks 0…n−2 only, so running the remaining blocks (and
back-propagating through nothing they compute) is waste. ``truncated_rollout`` records the states with the same
hooks as ``Backbone.rollout`` and ends the forward pass as soon as the last wanted state exists: the block that
produced it raises a private signal that is caught here. Everything computed before is the model's own
computation, so the states are bitwise those of a full rollout, and autograd graphs through them are intact.
"""

from __future__ import annotations

from deltactl.backbones import compat
from deltactl.backbones.base import Backbone, Trajectory


class _Enough(Exception):
    """Raised from a block hook once every wanted state is recorded."""


def truncated_rollout(backbone: Backbone, stack: str, n_states: int, run=None, **inputs) -> Trajectory:
    """Run until ``stack`` has produced h⁽⁰⁾…h⁽ⁿ⁻¹⁾ and return them (``output`` is None when cut short).

    Args:
        backbone: the model's Backbone (``dc.backbone_for(model)`` or ``delta.backbone``).
        stack: "encoder" or "decoder" (a stack of ``backbone.blocks()``).
        n_states: how many states to record, 1 ≤ n ≤ L + 1 (L blocks); n = L + 1 runs the whole model.
        run: the callable to run (default ``backbone.model``), e.g. a task model that holds the backbone.
        inputs: keyword arguments of ``run``.

    Returns:
        A Trajectory whose ``states[stack]`` has n entries; stacks that run before ``stack`` are recorded in full.

    Example:
        >>> traj = truncated_rollout(dc.backbone_for(bert), "encoder", 3, **batch)   # doctest: +SKIP
        >>> len(traj["encoder"])                                                     # blocks 0 and 1 ran
        3
    """
    blocks = backbone.blocks()
    if stack not in blocks:
        raise ValueError(f"this {backbone.family} model has no stack {stack!r}; it has {', '.join(blocks)}")
    depth = len(blocks[stack])
    if not 1 <= n_states <= depth + 1:
        raise ValueError(f"n_states must be in 1…{depth + 1} for the {depth}-block {stack} stack, got {n_states}")
    traj = Trajectory()
    handles = []
    for name, stack_blocks in blocks.items():
        states = traj.states.setdefault(name, [])
        limit = n_states if name == stack and n_states <= depth else None  # all L + 1 states: run to the end
        handles.append(stack_blocks[0].register_forward_pre_hook(_record_input(states, limit), with_kwargs=True))
        handles += [b.register_forward_hook(_record_output(states, limit)) for b in stack_blocks]
    run = backbone.model if run is None else run
    try:
        traj.output = run(**inputs)
    except _Enough:
        traj.output = None
    finally:
        for h in handles:
            h.remove()
    if len(traj.states[stack]) != n_states:
        raise RuntimeError(f"the forward pass recorded {len(traj.states[stack])} {stack} states, wanted {n_states}")
    return traj


def _record_input(states, limit):
    def hook(module, args, kwargs):
        states.append(compat.first_argument(module.forward, args, kwargs))
        if limit is not None and len(states) >= limit:
            raise _Enough

    return hook


def _record_output(states, limit):
    def hook(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)
        if limit is not None and len(states) >= limit:
            raise _Enough

    return hook
