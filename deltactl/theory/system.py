"""A controlled system as a graph of stages, its Pontryagin costates and per-stage Hamiltonians.

A system is a list of stages in forward order. Stage s reads state nodes x_s (several, for a decoder block that
also reads the encoder's output) and the controls δ (one dict of tensors shared by all stages), and either writes
the next node, y_s = G_s(δ, x_s), or is a terminal cost Φ_s(δ, x_s). Each stage may carry a running cost R_s(δ, x_s).
The objective is

    J(δ) = Σ_terminal Φ_s(δ, x_s) + Σ_s R_s(δ, x_s).

Sign convention (Li, Chen, Tai & E, "Maximum principle based algorithms for deep learning", JMLR 2018): costates
are *minus* the back-propagated adjoints, p_n = −∂J/∂x_n, and the stage Hamiltonians are

    H_s(x, p, δ) = p_{y_s} · G_s(δ, x_s) − R_s(δ, x_s)          (a state-producing stage)
    H_s(x, δ)    = −Φ_s(δ, x_s) − R_s(δ, x_s)                  (a terminal stage)

so that p_n = Σ_{s reads n} ∂H_s/∂x_n (the backward recursion p⁽ʲ⁾ = ∇_h H_j; on a chain p⁽ᴸ⁾ = −∇Φ(h⁽ᴸ⁾)),
∇_δ J = −Σ_s ∇_δ H_s, and the maximum principle says an optimal δ maximises Σ_s H_s. Where a node is read by
several stages its costate sums their contributions; this is how T5's decoder costates reach the encoder's final
state through every cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.func import grad, vjp

Controls = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """One map of the system.

    Args:
        name: e.g. ``"encoder.3"``.
        inputs: names of the nodes it reads (empty for an initial stage, whose state depends on δ only).
        output: the node it writes, or None for a terminal cost.
        step: ``step(controls, *inputs)`` → next state, or the scalar terminal cost Φ when ``output`` is None.
        cost: optional running cost ``cost(controls, *inputs)`` → scalar R_s.
    """

    name: str
    inputs: tuple[str, ...]
    output: str | None
    step: Callable
    cost: Callable | None = None


@dataclass
class Costates:
    """States x, costates p = −∂J/∂x, the objective J and ∇_δ H_s of each stage (a dict of tensors per stage)."""

    states: dict[str, torch.Tensor]
    costates: dict[str, torch.Tensor]
    objective: torch.Tensor
    hamiltonian_grads: dict[str, Controls] = field(default_factory=dict)

    def gradient(self) -> Controls:
        """∇_δ J = −Σ_s ∇_δ H_s."""
        total: Controls = {}
        for grads in self.hamiltonian_grads.values():
            for k, g in grads.items():
                total[k] = total[k] - g if k in total else -g
        return total


class ControlSystem:
    """A list of stages in forward (topological) order; see the module docstring for the maths."""

    def __init__(self, stages: list[Stage], recorded: dict[str, torch.Tensor] | None = None):
        produced = set()
        for s in stages:
            missing = [n for n in s.inputs if n not in produced]
            if missing:
                raise ValueError(f"stage {s.name!r} reads {missing} before any earlier stage writes them")
            if s.output is not None:
                if s.output in produced:
                    raise ValueError(f"node {s.output!r} is written twice (again by stage {s.name!r})")
                produced.add(s.output)
        if not any(s.output is None for s in stages):
            raise ValueError("a control system needs at least one terminal stage (output=None: the cost Φ)")
        self.stages = list(stages)
        self.recorded = recorded  # states of a rollout at the δ the system was built at, if known

    def forward(self, controls: Controls) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """All states and the objective J(δ) (differentiable in δ)."""
        states: dict[str, torch.Tensor] = {}
        total = 0.0
        for s in self.stages:
            args = [states[n] for n in s.inputs]
            value = s.step(controls, *args)
            if s.output is None:
                total = total + value
            else:
                states[s.output] = value
            if s.cost is not None:
                total = total + s.cost(controls, *args)
        return states, _tensor(total)

    def hamiltonian(self, stage: Stage, controls: Controls, args, p_out) -> torch.Tensor:
        """H_s(x_s, p_{y_s}, δ) as defined in the module docstring."""
        value = stage.step(controls, *args)
        h = -value if stage.output is None else (p_out * value).sum()
        if stage.cost is not None:
            h = h - stage.cost(controls, *args)
        return h

    def costates(self, controls: Controls, states: dict[str, torch.Tensor] | None = None) -> Costates:
        """Forward rollout (unless ``states`` are given), then the backward recursion p_n = Σ ∂H_s/∂x_n."""
        controls = {k: v.detach() for k, v in controls.items()}
        if states is None:
            with torch.no_grad():
                states, _ = self.forward(controls)
        states = {k: v.detach() for k, v in states.items()}
        p: dict[str, torch.Tensor] = {}
        dH: dict[str, Controls] = {}
        objective = 0.0
        for s in reversed(self.stages):
            args = tuple(states[n] for n in s.inputs)
            p_out = None
            if s.output is not None:
                p_out = p.get(s.output)
                if p_out is None:  # a state no later stage reads: it does not move J
                    p_out = torch.zeros_like(states[s.output])
            else:
                with torch.no_grad():
                    objective = objective + s.step(controls, *args)
            if s.cost is not None:
                with torch.no_grad():
                    objective = objective + s.cost(controls, *args)
            g_controls, g_args = _hamiltonian_grads(self, s, controls, args, p_out)
            dH[s.name] = g_controls
            for n, g in zip(s.inputs, g_args):
                p[n] = p[n] + g if n in p else g
        return Costates(states, p, _tensor(objective), dH)

    def gradient(self, controls: Controls) -> Controls:
        """∇_δ J by plain reverse-mode autograd through ``forward`` (the reference the costates must match)."""
        return grad(lambda c: self.forward(c)[1])({k: v.detach() for k, v in controls.items()})


def _hamiltonian_grads(system, stage, controls, args, p_out):
    """(∇_δ H_s, [∇_{x} H_s for each input]) by one vector–Jacobian product."""

    def h(c, *a):
        return system.hamiltonian(stage, c, a, p_out)

    value, pullback = vjp(h, controls, *args)
    grads = pullback(torch.ones_like(value))
    return grads[0], grads[1:]


def _tensor(value) -> torch.Tensor:
    """A sum of stage values as a tensor: kept as it is (on its device) when it is one already."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)
