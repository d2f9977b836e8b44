"""Models whose chosen tensors are recomputed at every forward from a few trainable ones, applied functionally.

``FunctionalDelta`` holds a reference to a model (not as a submodule, so its parameters are not the wrapper's),
freezes every parameter of it, and on each call computes the replacement tensors once and runs
``torch.func.functional_call(model, replacements, ...)``: the model's own tensors are never written, so no copy of
the model is made and ``detach`` only has to restore the requires_grad flags.
"""

from __future__ import annotations

from torch import nn
from torch.func import functional_call


class FunctionalDelta(nn.Module):
    """Base: ``values()`` gives {name: tensor} for the model's tensors ``names``; calling runs the model with them.

    Args:
        model: any nn.Module (a transformers model, a task classifier around one, …).
        names: names in ``model.named_parameters()`` whose values ``values()`` replaces.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        params = dict(model.named_parameters())
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a parameter of the model; e.g. {', '.join(list(params)[:3])}")
        if not names:
            raise ValueError("no parameters selected: the subspace would act on nothing")
        self._model = (model,)  # a tuple keeps the model out of this module's parameters and state_dict
        self.names = list(names)
        self.base = {n: params[n] for n in self.names}  # θ₀: references to the frozen tensors, not copies
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in self._flags:
            p.requires_grad_(False)
        self._attached = True

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def values(self) -> dict:
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        self._check_attached()
        return functional_call(self.model, self.values(), args, kwargs, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.train(mode)  # dropout of the wrapped model follows the wrapper
        return self

    def trainable(self) -> dict:
        """{name: parameter} of what trains (for ``deltactl.train.loop.fit``)."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable().values())

    def detach(self) -> None:
        """Give the model back: its requires_grad flags as before; its tensors were never changed."""
        self._check_attached()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        self._attached = False

    def _check_attached(self):
        if not self._attached:
            raise RuntimeError("this subspace wrapper was detached; build a new one to train again")
