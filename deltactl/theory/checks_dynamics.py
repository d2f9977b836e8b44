"""Numerical checks of the dynamical statements: costates, the MSA step, the linear–quadratic optimum."""

from __future__ import annotations

import torch

import deltactl as dc
from deltactl.theory import fixtures as fx
from deltactl.theory.lq import LQProblem, riccati
from deltactl.theory.model import model_system, state_gradients, trainable_controls
from deltactl.theory.msa import MSA, MSAConfig, linearised_step


def _relative(a: dict, b: dict) -> float:
    scale = max(max(v.abs().max().item() for v in b.values()), 1e-300)
    return max((a[k] - b[k]).abs().max().item() for k in b) / scale


ATTENTIONS = ("eager", "sdpa")  # reverse-mode checks run under both kernels


def _cases():
    """(label, model, batch) for every registered method on the tiny T5 and the tiny BERT, under eager and SDPA
    attention, δ perturbed."""
    for method in fx.registered_methods():
        for family, make, batch in (("t5", fx.tiny_t5, fx.t5_batch), ("bert", fx.tiny_bert, fx.bert_batch)):
            for attention in ATTENTIONS:
                model = make(attention=attention)
                delta = dc.attach(model, fx.small_config(method))
                fx.perturb(delta.parameters())
                yield f"{family}/{method}/{attention}", model.eval(), batch()  # eval: no dropout, no sampled gates


def costates_equal_autograd() -> tuple[float, str]:
    """max relative error of p⁽ʲ⁾ against −∂J/∂h⁽ʲ⁾ and of −Σ_j ∇_δ H_j against ∇_δ J (autograd)."""
    worst, where = 0.0, ""
    for label, model, batch in _cases():
        view = model_system(model, batch).costates(trainable_controls(model))
        model.zero_grad()
        reference = {k: -v for k, v in state_gradients(model, batch).items()}  # also fills p.grad
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        err = max(_relative(view.costates, reference), _relative(view.gradient(), grads))
        if err >= worst:
            worst, where = err, label
    return worst, f"worst case {where} (T5: both stacks, cross-attention coupling)"


def msa_linearised_step_is_gradient_descent(proximal: float = 4.0) -> tuple[float, str]:
    """max |linearised proximal MSA step − (δ − ∇J / c)| over every method, tiny T5 and BERT."""
    worst, where = 0.0, ""
    for label, model, batch in _cases():
        controls = trainable_controls(model)
        msa = linearised_step(model_system(model, batch), controls, proximal)
        model.zero_grad()
        model(**batch).loss.backward()
        gd = {n: p.detach() - p.grad / proximal for n, p in model.named_parameters() if p.requires_grad}
        err = _relative(msa, gd)
        if err >= worst:
            worst, where = err, label
    return worst, f"worst case {where}, proximal weight c = {proximal}"


def msa_reaches_riccati_optimum(iterations: int = 150) -> tuple[float, str]:
    """MSA (proximal, gradient-ascent inner steps) on a random LQ problem against the Riccati solution."""
    problem = LQProblem.random(n=4, m=2, horizon=8, seed=0)
    u_star, j_star = riccati(problem)
    system = problem.system()
    params = {k: torch.nn.Parameter(v) for k, v in problem.controls().items()}
    msa = MSA(params, MSAConfig(lr=0.3, inner_steps=2, proximal=2.0, optimizer="sgd"))
    done = 0
    while done < iterations:
        msa.step(system)
        done += 1
        if max((params[k] - u_star[k]).abs().max().item() for k in params) < 1e-11:
            break
    cost = system.forward(params)[1].item()
    u_err = max((params[k] - u_star[k]).abs().max().item() for k in params)
    err = max(abs(cost - j_star.item()) / j_star.item(), u_err)
    return err, f"J = {cost:.10f}, J* = {j_star.item():.10f}, max|u − u*| = {u_err:.1e} after {done} iterations"
