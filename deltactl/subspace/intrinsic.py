"""DID and SAID: train a set of tensors inside a random d-dimensional subspace (Aghajanyan, Zettlemoyer & Gupta,
"Intrinsic dimensionality explains the effectiveness of language model fine-tuning", ACL 2021; Li et al. 2018).

    DID:   θ_i = θ₀_i + (P z)_i            SAID:  θ_i = θ₀_i + λ_i (P z)_i

over the tensors θ_i (flattened and concatenated, D entries in all), with z ∈ ℝ^d zero at the start (the model
is then exactly θ₀) and one scale λ_i per tensor in SAID (initialised to 1, so SAID with λ ≡ 1 is DID; the
paper counts the m scales inside d, here they are m extra parameters). P z is computed once per forward and
split over the tensors. The tensors are either all weights of a model (``intrinsic``, the intrinsic-dimension
setting) or the δ of any registered delta method (``subspace``: e.g. LoRA's A and B, δ₀ their initial values).
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from deltactl.subspace.functional import FunctionalDelta
from deltactl.subspace.projections import make_projection


class Subspace(FunctionalDelta):
    """θ = θ₀ + (λ ⊙) P z over the tensors ``names`` of ``model``; z (and λ with ``said``) are the only parameters.

    Args:
        model: the module called; names: its parameters in the subspace; d: subspace dimension.
        said: add one trainable scale per tensor (SAID); False is DID.
        projection: "fastfood" (default), "sparse" or "dense"; seed: its random draw; options: for the projection.

    Example:
        >>> sub = Subspace(model, ["0.weight", "0.bias"], d=8)      # doctest: +SKIP
        >>> out = sub(x)                                             # doctest: +SKIP  (model(x) while z = 0)
    """

    def __init__(self, model, names, d: int, *, said: bool = False, projection: str = "fastfood", seed: int = 0,
                 **options):
        super().__init__(model, names)
        reference = next(iter(self.base.values()))
        self.shapes = [self.base[n].shape for n in self.names]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.D = sum(self.sizes)
        self.said = said
        self.projection = make_projection(projection, d, self.D, seed=seed, **options).to(
            device=reference.device, dtype=reference.dtype
        )
        self.z = nn.Parameter(torch.zeros(d, dtype=reference.dtype, device=reference.device))
        if said:
            self.scales = nn.Parameter(torch.ones(len(self.names), dtype=reference.dtype, device=reference.device))

    @property
    def d(self) -> int:
        return self.z.numel()

    def offsets(self) -> list[torch.Tensor]:
        """(λ_i ⊙) (P z)_i per tensor, shaped like it: P z once, then views of it."""
        pieces = self.projection(self.z).split(self.sizes)
        if self.said:
            return [s * p.view(shape) for s, p, shape in zip(self.scales, pieces, self.shapes)]
        return [p.view(shape) for p, shape in zip(pieces, self.shapes)]

    def values(self) -> dict:
        return {n: self.base[n] + off for n, off in zip(self.names, self.offsets())}

    @torch.no_grad()
    def merged(self) -> dict:
        """{name: θ₀ + (λ ⊙) P z} detached, e.g. to save the trained weights or load them into a plain model."""
        return {n: v.detach().clone() for n, v in self.values().items()}

    def extra_repr(self) -> str:
        kind = "SAID" if self.said else "DID"
        return f"{kind}: d={self.d}, D={self.D:,} over {len(self.names)} tensors"


def intrinsic(model: nn.Module, d: int, *, said: bool = False, exclude: tuple[str, ...] = (), **options) -> Subspace:
    """DID/SAID over every weight of ``model`` (the intrinsic-dimension setting), minus names matching ``exclude``.

    Args:
        model: the module; d: subspace dimension; said: SAID instead of DID.
        exclude: glob patterns of parameter names kept frozen at θ₀ (outside the subspace).
        options: ``projection``, ``seed`` and projection options, as for ``Subspace``.
    """
    names = [
        n for n, _ in model.named_parameters()
        if not n.startswith("deltactl.") and not any(fnmatch.fnmatchcase(n, pat) for pat in exclude)
    ]
    return Subspace(model, names, d, said=said, **options)


class ControllerSubspace(Subspace):
    """A Subspace over the δ of an attached controller; ``detach`` also detaches the controller (exact)."""

    def __init__(self, model, delta, d, **kwargs):
        prefix = f"deltactl.{delta.name}."
        super().__init__(model, [prefix + n for n, _ in delta.named_parameters()], d, **kwargs)
        self.delta = delta

    def detach(self) -> None:
        super().detach()
        self.delta.detach()


def subspace(model: nn.Module, method, d: int, *, said: bool = False, projection: str = "fastfood", seed: int = 0,
             name: str | None = None, **method_options) -> ControllerSubspace:
    """Attach delta method ``method`` to ``model`` and train its δ = δ₀ + (λ ⊙) P z inside a d-dim subspace.

    Args:
        model: a transformers model of a supported family; method: a method name (with ``method_options``) or config.
        d: subspace dimension; said: SAID instead of DID; projection, seed: the random projection.

    Returns:
        The wrapper: call it like the model; ``trainable()`` is {z (, scales)}; ``detach()`` removes everything.

    Example:
        >>> sub = subspace(t5, "lora", d=64, r=4)                   # doctest: +SKIP
        >>> loss = sub(input_ids=ids, labels=labels).loss           # doctest: +SKIP
    """
    from deltactl.control.attach import attach

    delta = attach(model, method, name=name, **method_options)
    try:
        return ControllerSubspace(model, delta, d, said=said, projection=projection, seed=seed)
    except Exception:
        delta.detach()
        raise
