"""The method of successive approximations (MSA) and extended MSA as a trainer for any controller.

Li, Chen, Tai & E, "Maximum principle based algorithms for deep learning", JMLR 18 (2018). One iteration at
controls δ_k:

1. forward rollout: states x_s of every stage at δ_k;
2. backward recursion: costates p (``ControlSystem.costates``, p = −∂J/∂x);
3. maximisation, with x and p frozen, of the augmented Hamiltonian with a proximal term

       M(δ) = Σ_s H_s(x_s, p_{y_s}, δ)
              − ρ/2 Σ_s ‖y_s − G_s(δ, x_s)‖²                       (feasibility of the forward equation)
              − ρ/2 Σ_n ‖p_n − Σ_{s reads n} ∂H_s/∂x_n(δ)‖²          (consistency of the backward equation)
              − c/2 ‖δ − δ_k‖²                                       (proximal term)

   ρ = 0 is the basic MSA, ρ > 0 the extended one (E-MSA). Each parameter of δ enters the H_s of the stages
   where it acts, so for per-layer controllers M splits into one problem per layer (parameters shared by several
   layers, such as prefix-tuning's MLP, couple theirs). The maximisation is approximate: ``inner_steps`` steps of
   a first-order ascent (Adam or plain gradient ascent), as in the paper's experiments.

Linearised step: replacing H by its first-order expansion at δ_k (the E-MSA residuals vanish at δ_k, and so do
their gradients) gives the maximiser δ_k + (1/c) Σ_s ∇_δ H_s = δ_k − (1/c) ∇_δ J: gradient descent with step 1/c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltactl.theory.system import Controls, ControlSystem, Costates


@dataclass(frozen=True)
class MSAConfig:
    """Args: lr inner ascent step; inner_steps ascent steps per iteration; rho E-MSA penalty (0: basic MSA);
    proximal c of the proximal term; optimizer "adam" or "sgd" (plain gradient ascent)."""

    lr: float = 1e-3
    inner_steps: int = 2
    rho: float = 0.0
    proximal: float = 0.0
    optimizer: str = "adam"

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"MSA optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.inner_steps < 1 or self.lr <= 0 or self.rho < 0 or self.proximal < 0:
            raise ValueError(
                f"MSA needs inner_steps ≥ 1, lr > 0, rho ≥ 0 and proximal ≥ 0; got inner_steps={self.inner_steps}, "
                f"lr={self.lr}, rho={self.rho}, proximal={self.proximal}"
            )


def augmented_hamiltonian(system: ControlSystem, view: Costates, controls: Controls, anchor: Controls,
                          rho: float = 0.0, proximal: float = 0.0) -> torch.Tensor:
    """M(δ) of the module docstring, differentiable in ``controls`` (states and costates from ``view``)."""
    x, p = view.states, view.costates
    total = 0.0
    backward: dict[str, torch.Tensor] = {}
    for s in system.stages:
        args = tuple(x[n].detach().requires_grad_(rho > 0) for n in s.inputs)
        p_out = p.get(s.output, torch.zeros_like(x[s.output])) if s.output is not None else None
        value = s.step(controls, *args)
        h = -value if s.output is None else (p_out * value).sum()
        if s.cost is not None:
            h = h - s.cost(controls, *args)
        total = total + h
        if rho > 0:
            if s.output is not None:
                total = total - 0.5 * rho * (x[s.output] - value).pow(2).sum()
            if args:
                dx = torch.autograd.grad(h, args, create_graph=True, allow_unused=True)
                for n, a, g in zip(s.inputs, args, dx):
                    g = torch.zeros_like(a) if g is None else g
                    backward[n] = backward[n] + g if n in backward else g
    for n, g in backward.items():
        total = total - 0.5 * rho * (p[n] - g).pow(2).sum()
    if proximal > 0:
        total = total - 0.5 * proximal * sum((controls[k] - anchor[k]).pow(2).sum() for k in controls)
    return total


def linearised_step(system: ControlSystem, controls: Controls, proximal: float) -> Controls:
    """argmax of the linearised H with proximal term c: δ_k + (1/c) Σ_s ∇_δ H_s (equals δ_k − (1/c) ∇_δ J)."""
    if proximal <= 0:
        raise ValueError(f"the linearised MSA step needs a proximal weight c > 0, got {proximal}")
    view = system.costates(controls)
    total: Controls = {k: torch.zeros_like(v) for k, v in controls.items()}
    for grads in view.hamiltonian_grads.values():
        for k, g in grads.items():
            total[k] = total[k] + g
    return {k: controls[k].detach() + total[k] / proximal for k in controls}


class MSA:
    """(E-)MSA trainer over named parameters (a controller's δ, plus a task head if it trains).

    Example:
        >>> msa = MSA(dict(model.named_parameters()), MSAConfig(lr=1e-3))       # doctest: +SKIP
        >>> info = msa.step(model_system(model, batch, loss_fn))                 # doctest: +SKIP
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], config: MSAConfig = MSAConfig()):
        self.params = {k: p for k, p in params.items() if p.requires_grad}
        if not self.params:
            raise ValueError("MSA got no trainable parameters (requires_grad=True); attach a delta first")
        self.config = config
        groups = list(self.params.values())
        if config.optimizer == "adam":
            self.optimizer = torch.optim.Adam(groups, lr=config.lr, maximize=True)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, maximize=True)

    def step(self, system: ControlSystem) -> dict:
        """One MSA iteration on ``system`` (built on the current parameters); returns J and M before/after."""
        anchor = {k: p.detach().clone() for k, p in self.params.items()}
        view = system.costates(anchor, system.recorded)
        cfg = self.config
        first = last = None
        for _ in range(cfg.inner_steps):
            self.optimizer.zero_grad(set_to_none=True)
            value = augmented_hamiltonian(system, view, self.params, anchor, cfg.rho, cfg.proximal)
            value.backward()
            self.optimizer.step()
            first = value.item() if first is None else first
            last = value.item()
        self.optimizer.zero_grad(set_to_none=True)
        return {"objective": view.objective.item(), "hamiltonian_first": first, "hamiltonian_last": last}
