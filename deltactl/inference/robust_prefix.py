"""Robust prefix-tuning (Yang & Liu, "On robust prefix-tuning for text classification", ICLR 2022).

A trained prefix P_θ stays fixed; for each test batch an extra prefix ψ (same shape, zero-initialised) is tuned
so that the summed prefix P_θ + ψ steers the bottom N layers' activations at the output position back onto the
canonical manifolds of correctly classified training data (``manifold.py``):

    min_ψ  Σ_{j<N} mean ‖ (h⁽ʲ⁾ − μ̄⁽ʲ⁾)(I − Q⁽ʲ⁾) ‖²        (h⁽ʲ⁾ the state entering block j, at the output position)

i.e. ‖h̃Q + μ̄ − h‖² with h̃ = h − μ̄, the mean squared component of the centred activation orthogonal to the
manifold, minimised with Adam for a few steps, after which the batch is classified with P_θ + ψ*. Following the
authors' code, μ̄ is the mean of the *test batch*'s activations (a batch of one is not centred: its own mean would
make the cost vanish); ``center="train"`` uses the training mean μ⁽ʲ⁾ instead, the distance to the affine manifold.

Output position: the paper reads GPT-2 at the [ANS] token, where the label is generated. deltactl's classifier
mean-pools the top layer over the real tokens and feeds that vector to its head, so the output position of layer j
is the same masked mean of h⁽ʲ⁾ (``readout="mean"``; ``"first"`` uses [CLS]; ``"last"`` the last real token, the
paper's own reading on GPT-2: pass ``stack="decoder"`` and a classifier that reads the label there). h⁽⁰⁾ (the
embeddings) does not depend on the prefix, so its term is a constant; only blocks 0…N−2 run while ψ is tuned (a
truncated rollout). ψ lives on the memories of those blocks: rows of higher layers would receive zero gradient and
stay exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from deltactl.control.attach import Delta
from deltactl.control.controller import site_key
from deltactl.inference.loop import InferenceResult, optimize
from deltactl.inference.manifold import Subspace, canonical_subspace, pool
from deltactl.inference.rollout import truncated_rollout
from deltactl.methods.prefix import Prefix


@dataclass(frozen=True)
class CanonicalManifold:
    """Per-layer subspaces of h⁽⁰⁾…h⁽ᴸ⁾ at the output position, and how they were built."""

    layers: tuple[Subspace, ...]
    readout: str
    examples: int  # correctly classified examples the manifold was built from
    seen: int  # examples run


def fit_manifold(delta: Delta, batches, classify: Callable[..., torch.Tensor], *, readout: str = "mean",
                 threshold: float = 0.99, stack: str = "encoder") -> CanonicalManifold:
    """Run training batches with the trained prefix, keep the correctly classified ones, build every layer's Q.

    Args:
        delta: the attached, trained prefix.
        batches: iterable of (inputs, labels), inputs the keyword arguments of ``classify``.
        classify: the task model (e.g. deltactl's SequenceClassifier); its logits' argmax is the prediction.
        readout: the output position (see the module docstring); threshold: kept share of the singular values.
    """
    depth = len(delta.backbone.blocks()[stack])
    kept: list[list[torch.Tensor]] = [[] for _ in range(depth + 1)]
    seen = 0
    with torch.no_grad():
        for inputs, labels in batches:
            traj = truncated_rollout(delta.backbone, stack, depth + 1, run=classify, **inputs)
            correct = traj.output.argmax(-1) == labels
            seen += labels.numel()
            for j, state in enumerate(traj[stack]):
                kept[j].append(pool(state, inputs.get("attention_mask"), readout)[correct])
    stacked = [torch.cat(k) for k in kept]
    if stacked[0].shape[0] < 2:
        raise ValueError(f"only {stacked[0].shape[0]} of {seen} examples were classified correctly; need ≥ 2")
    layers = tuple(canonical_subspace(h, threshold) for h in stacked)
    return CanonicalManifold(layers, readout, stacked[0].shape[0], seen)


def manifold_cost(manifold: CanonicalManifold, n_layers: int, attention_mask, center: str = "batch",
                  stack: str = "encoder"):
    """The state cost Σ_{j<N} mean ‖(h⁽ʲ⁾ − μ̄)(I − Q⁽ʲ⁾)‖² on a trajectory (mean over batch and channels)."""
    if center not in ("batch", "train"):
        raise ValueError(f"center must be 'batch' (the paper's) or 'train', got {center!r}")

    def cost(traj):
        total = 0.0
        for j in range(n_layers):
            h = pool(traj[stack][j], attention_mask, manifold.readout)
            sub = manifold.layers[j]
            if center == "train":
                mu = sub.mean.to(h.dtype)
            else:
                mu = h.mean(0) if h.shape[0] > 1 else None
            total = total + sub.residual(h, mu).pow(2).mean()
        return total

    return cost


class RobustPrefix:
    """Per-batch robust inference for an attached prefix: tune ψ against the manifold cost, classify, restore.

    Args:
        delta: the attached trained prefix (a ``prefix`` delta on a BERT or T5 encoder).
        manifold: from ``fit_manifold``.
        classify: the task model whose logits are returned.
        n_layers: N, the bottom layers in the cost (states h⁽⁰⁾…h⁽ᴺ⁻¹⁾; 2 ≤ N ≤ L + 1).
        steps, lr: Adam steps on ψ and their learning rate.
        center: "batch" (the paper's) or "train" (see the module docstring).
        truncate: run only blocks 0…N−2 while tuning ψ (default); False runs the whole classifier every step
            (the same ψ up to rounding, for comparison).

    Example:
        >>> manifold = fit_manifold(delta, train_batches, clf)                          # doctest: +SKIP
        >>> robust = RobustPrefix(delta, manifold, clf, n_layers=3, steps=2, lr=0.02)   # doctest: +SKIP
        >>> logits = robust(**batch).outputs                                            # doctest: +SKIP
    """

    def __init__(self, delta: Delta, manifold: CanonicalManifold, classify, *, n_layers: int = 3, steps: int = 3,
                 lr: float = 0.05, center: str = "batch", stack: str = "encoder", truncate: bool = True):
        if not isinstance(delta.controller, Prefix):
            raise TypeError(f"RobustPrefix needs an attached prefix delta, got {type(delta.controller).__name__}")
        depth = len(delta.backbone.blocks()[stack])
        if not 2 <= n_layers <= min(depth + 1, len(manifold.layers)):
            raise ValueError(f"n_layers must be in 2…{min(depth + 1, len(manifold.layers))}, got {n_layers}")
        self.delta, self.manifold, self.classify = delta, manifold, classify
        self.n_layers, self.steps, self.lr, self.center, self.stack = n_layers, steps, lr, center, stack
        self.depth = n_layers if truncate else depth + 1  # states the rollout records
        prefix = delta.controller
        # ψ on the memories of blocks 0…N−2, the only ones the bottom N states depend on.
        sites = [s.name for s in prefix.sites if s.stack == stack and s.layer is not None and s.layer < n_layers - 1]
        if not sites:
            raise ValueError(f"the prefix has no memory site in {stack} blocks 0…{n_layers - 2}")
        with torch.no_grad():
            self.psi = nn.ParameterDict({site_key(s): nn.Parameter(torch.zeros_like(prefix.site_rows(s)))
                                         for s in sites})

    def __call__(self, **inputs) -> InferenceResult:
        """Tune ψ on this batch (starting at 0), return the classifier's outputs under P_θ + ψ*; ψ is back to 0."""
        cost = manifold_cost(self.manifold, self.n_layers, inputs.get("attention_mask"), self.center, self.stack)
        backbone = self.delta.backbone

        def rollout(**batch):
            return truncated_rollout(backbone, self.stack, self.depth, run=self.classify, **batch)

        with shifted_prefix(self.delta.controller, self.psi):
            return optimize(self.delta, cost, inputs, steps=self.steps, lr=self.lr, free=list(self.psi.values()),
                            rollout=rollout, forward=self.classify)


@contextmanager
def shifted_prefix(prefix: Prefix, psi: nn.ParameterDict):
    """Within the block the prefix's rows at each site of ``psi`` are P_θ + ψ (P_θ computed once, held fixed).

    The rows a memory reads come from ``prefix.site_rows``; an instance attribute shadows that method for the
    duration and is deleted at exit, which leaves the controller exactly as it was.
    """
    with torch.no_grad():
        base = {s.name: prefix.site_rows(s.name) for s in prefix.sites}
    shifts = {s.name: psi[site_key(s.name)] for s in prefix.sites if site_key(s.name) in psi}

    def rows(site):
        return base[site] + shifts[site] if site in shifts else base[site]

    if "site_rows" in prefix.__dict__:
        raise RuntimeError("the prefix's rows are already shifted; nested shifts are not supported")
    prefix.__dict__["site_rows"] = rows
    try:
        yield
    finally:
        del prefix.__dict__["site_rows"]
