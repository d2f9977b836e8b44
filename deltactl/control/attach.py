"""Attach and detach controllers; only δ trains while attached, and detaching restores the model exactly."""

from __future__ import annotations

from torch import nn

from deltactl.backbones import backbone_for
from deltactl.control.combinators import Chain, Combination, Sum
from deltactl.control.controller import Controller
from deltactl.methods import registry

ROOT = "deltactl"  # the attribute of the model under which attached controllers live


def build(config, backbone) -> Controller:
    """The controller a config (or a chain/sum of configs) describes, on this backbone's sites."""
    if isinstance(config, Combination):
        parts = [build(p, backbone) for p in config.parts]
        return (Chain if config.how == "chain" else Sum)(config, parts)
    return registry.get(config.method).build(config, backbone, registry.sites_of(config, backbone.sites))


class Delta:
    """A controller attached to a model: its handle for parameters, detaching and saving."""

    def __init__(self, model, backbone, controller: Controller, name: str, handles: list):
        self.model, self.backbone, self.controller = model, backbone, controller
        self.name, self._handles = name, handles

    @property
    def config(self):
        return self.controller.config

    @property
    def attached(self) -> bool:
        return self._handles is not None

    def parameters(self):
        return self.controller.parameters()

    def named_parameters(self):
        return self.controller.named_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.controller.parameters())

    def detach(self) -> None:
        """Remove the controller; the model is then bit-identical to before ``attach``."""
        if self._handles is None:
            raise RuntimeError(f"delta {self.name!r} is already detached")
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = None
        root = self.model.get_submodule(ROOT)
        del root[self.name]
        if len(root) == 0:
            for param, flag in zip(_base_parameters(self.model), root.base_requires_grad):
                param.requires_grad_(flag)
            delattr(self.model, ROOT)

    def save(self, path) -> None:
        from deltactl.control.io import save

        save(self, path)

    def __repr__(self):
        state = "attached" if self.attached else "detached"
        return f"Delta({self.name!r}, {self.config!r}, {self.num_parameters():,} parameters, {state})"


def attach(model: nn.Module, config, *, name: str | None = None, **options) -> Delta:
    """Attach a delta method to ``model`` and freeze everything but δ.

    Args:
        model: a transformers model of a supported family (T5, BERT).
        config: a method name (with ``options``), a method config, or ``chain(...)``/``sum(...)`` of configs.
        name: the delta's name on the model (default: the method name, numbered if taken).

    Returns:
        The attached ``Delta``.

    Example:
        >>> delta = attach(model, "lora", r=8)            # doctest: +SKIP
        >>> delta.detach()                                # doctest: +SKIP
    """
    if isinstance(config, str):
        config = registry.make_config(config, **options)
    elif options:
        raise TypeError("options go with a method name; pass a config object or a name, not both")
    backbone = backbone_for(model)
    controller = build(config, backbone)
    reference = next(p for p in _base_parameters(model) if p.is_floating_point())
    controller.to(device=reference.device, dtype=reference.dtype)

    root = model._modules.get(ROOT)
    if root is None:
        base = list(_base_parameters(model))
        root = nn.ModuleDict()
        root.base_requires_grad = [p.requires_grad for p in base]  # restored when the last delta leaves
        for p in base:
            p.requires_grad_(False)
        model.add_module(ROOT, root)
    name = name or _free_name(root, config.method)
    if name in root:
        raise ValueError(f"a delta named {name!r} is already attached; pick another name or detach it first")
    root[name] = controller
    for p in controller.parameters():
        p.requires_grad_(True)
    handles = [backbone.hook(site, law) for site, law in controller.controls()]
    return Delta(model, backbone, controller, name, handles)


def _free_name(root, base: str) -> str:
    name, k = base, 1
    while name in root:
        k += 1
        name = f"{base}_{k}"
    return name


def _base_parameters(model):
    """The model's own parameters (not those of attached controllers), in a fixed order."""
    for name, param in model.named_parameters():
        if not name.startswith(ROOT + "."):
            yield param


def base_named_parameters(model):
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(ROOT + ".")]




def attached_deltas(model) -> dict[str, Controller]:
    root = model._modules.get(ROOT)
    return dict(root.items()) if root is not None else {}
