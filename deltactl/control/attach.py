"""Attach and detach controllers; only δ trains while attached, and detaching restores the model exactly."""

from __future__ import annotations

import torch
from torch import nn

from deltactl.backbones import backbone_for
from deltactl.control import registry
from deltactl.control.combinators import Chain, Combination, Sum
from deltactl.control.controller import Controller
from deltactl.control.io import save
from deltactl.control.merge import reshard, restore_weights, write_weights
from deltactl.control.root import ROOT, base_parameters, deltas


def check_options(config):
    """Refuse option values of the wrong type (``r='eight'``, ``r=2.5``), naming the option, the value and the
    type the method takes; returns ``config``."""
    import dataclasses
    import typing

    if isinstance(config, Combination):
        for part in config.parts:
            check_options(part)
        return config
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), hints.get(f.name)
        allowed = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, __import__("types").UnionType) \
            else (kind,)
        if any(_fits(value, k) for k in allowed):
            continue
        names = " or ".join(_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in allowed)
        raise ValueError(f"{config.method} option {f.name}={value!r}: must be {names}")
    return config


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a name",
               type(None): "unset"}


def _fits(value, kind) -> bool:
    import typing

    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is type(None):
        return value is None
    origin = typing.get_origin(kind)
    if origin is tuple:
        inner = [a for a in typing.get_args(kind) if a is not Ellipsis]
        return isinstance(value, tuple) and all(any(_fits(v, k) for k in inner) for v in value)
    if isinstance(kind, type):
        return isinstance(value, kind)
    return True  # an annotation this check does not know: left to the method


def build(config, backbone) -> Controller:
    """The controller a config (or a chain/sum of configs) describes, on this backbone's sites."""
    if isinstance(config, Combination):
        parts = [build(p, backbone) for p in config.parts]
        return (Chain if config.how == "chain" else Sum)(config, parts)
    return registry.get(config.method).build(config, backbone, registry.sites_of(config, backbone.sites))


class Delta:
    """A controller attached to a model: its handle for parameters, switching, merging, detaching and saving.

    A delta is *active* (its laws act in the forward pass) or disabled; *frozen* (its δ does not train, as an
    earlier stage of a sequential combination) or trainable; *merged* (its effect written into the base weights,
    for the methods whose effect is a weight change) or not. Laws of several deltas at one site apply in the
    order the deltas were attached, whatever is switched on and off in between.
    """

    def __init__(self, model, backbone, controller: Controller, name: str):
        self.model, self.backbone, self.controller, self.name = model, backbone, controller, name
        self.active, self.frozen = True, False
        self._handles: list | None = []
        self._merged = None  # the base weights a merge replaced, kept to restore them exactly

    @property
    def config(self):
        return self.controller.config

    @property
    def attached(self) -> bool:
        return self._handles is not None

    @property
    def merged(self) -> bool:
        return self._merged is not None

    def parameters(self):
        return self.controller.parameters()

    def named_parameters(self):
        return self.controller.named_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.controller.parameters())

    def enable(self) -> "Delta":
        return self._set(active=True)

    def disable(self) -> "Delta":
        """Stop acting (the model runs as if this delta were absent); δ is kept and stops training."""
        return self._set(active=False)

    def freeze(self) -> "Delta":
        """Keep acting but stop training (an earlier stage of a sequential combination)."""
        return self._set(frozen=True)

    def unfreeze(self) -> "Delta":
        return self._set(frozen=False)

    def merge(self) -> "Delta":
        """Write the delta's effect into the base weights (θ ← G(θ)); the delta then acts through the weights only
        (see ``deltactl.control.merge``)."""
        self._check_attached()
        if self.merged:
            raise RuntimeError(f"delta {self.name!r} is already merged")
        if not self.active:
            raise RuntimeError(f"delta {self.name!r} is disabled; enable it before merging")
        self._merged = write_weights(self.backbone, self.controller.weight_laws())
        reinstall(self.model, self)
        return self

    def unmerge(self) -> "Delta":
        """Restore the base weights exactly and act through the laws again."""
        if not self.merged:
            raise RuntimeError(f"delta {self.name!r} is not merged")
        reshard(self.model)  # FSDP2 keeps the root's parameters gathered after a forward pass
        restore_weights(self._merged)
        self._merged = None
        reinstall(self.model, self)
        return self

    def _set(self, **state) -> "Delta":
        self._check_attached()
        if self.merged and state.get("active") is False:
            raise RuntimeError(f"delta {self.name!r} is merged into the weights; unmerge it before disabling it")
        for key, value in state.items():
            setattr(self, key, value)
        reinstall(self.model, self)
        return self

    def _check_attached(self):
        if self._handles is None:
            raise RuntimeError(f"delta {self.name!r} is detached")

    def detach(self) -> None:
        """Remove the controller (unmerging it first); the model is then bit-identical to before ``attach``."""
        self._check_attached()
        if self.merged:
            self.unmerge()
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = None
        root = self.model.get_submodule(ROOT)
        del root[self.name]
        del root.handles[self.name]
        if len(root) == 0:
            for param, flag in zip(base_parameters(self.model), root.base_requires_grad):
                param.requires_grad_(flag)
            delattr(self.model, ROOT)

    def save(self, path) -> None:
        """Write δ, its config and the base's fingerprint to the folder ``path`` (see ``deltactl.control.io``)."""
        save(self, path)

    def __repr__(self):
        state = ("merged" if self.merged else "active" if self.active else "disabled") if self.attached else "detached"
        frozen = ", frozen" if self.frozen and self.attached else ""
        return f"Delta({self.name!r}, {self.config!r}, {self.num_parameters():,} parameters, {state}{frozen})"


def attach(model: nn.Module, config, *, name: str | None = None, dtype: torch.dtype | None = None, **options) -> Delta:
    """Attach a delta method to ``model`` and freeze everything but δ.

    Args:
        model: a transformers model of a supported family (T5, BERT).
        config: a method name (with ``options``), a method config, or ``chain(...)``/``sum(...)`` of configs.
        name: the delta's name on the model (default: the method name, numbered if taken). Several deltas may be
            attached at once: they act together (a simultaneous combination) unless switched with ``use``.
        dtype: δ's dtype. Default ``delta_dtype(base dtype)``: float32 on a float16/bfloat16 base (as PEFT's
            ``autocast_adapter_dtype``), the base's dtype otherwise. The laws compute in δ's dtype and hand the
            model its own dtype back, so outputs keep the base dtype and an update far below the base dtype's
            resolution still changes δ.

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
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"δ's dtype must be a floating-point dtype, got {dtype}")
    check_options(config)
    # Everything that can fail without touching the model comes first: building δ, its size, its name.
    backbone = backbone_for(model)
    controller = build(config, backbone)
    if not list(getattr(controller, "sites", [None])):
        raise ValueError(f"{config.method} with sites={tuple(getattr(config, 'sites', ()))!r} acts on no site (0 "
                         "trainable parameters): give site patterns that match at least one site it acts on")
    root = model._modules.get(ROOT)
    name = name or _free_name(root if root is not None else {}, config.method)
    if root is not None and name in root:
        raise ValueError(f"a delta named {name!r} is already attached; pick another name or detach it first")
    if "." in name or not name:
        raise ValueError(f"delta name {name!r} must be non-empty and without dots (it names a module)")
    reference = next(p for p in base_parameters(model) if p.is_floating_point())
    controller.to(device=reference.device, dtype=dtype or delta_dtype(reference.dtype))
    controller.train(model.training)  # a model in eval mode gets an eval-mode controller (dropout, gates)

    created = root is None
    if created:
        base = list(base_parameters(model))
        root = nn.ModuleDict()
        root.base_requires_grad = [p.requires_grad for p in base]  # restored when the last delta leaves
        root.handles = {}  # name -> Delta, in attachment order
    delta = Delta(model, backbone, controller, name)
    try:  # all or nothing: a failure below leaves the model as it was
        if created:
            for p in base:
                p.requires_grad_(False)
            model.add_module(ROOT, root)
        root[name] = controller
        root.handles[name] = delta
        reinstall(model, delta)
    except BaseException:
        for d in deltas(model).values():
            for handle in reversed(d._handles or []):
                handle.remove()
            if d._handles is not None:
                d._handles = []
        root.handles.pop(name, None)
        if name in root:
            del root[name]
        if created:
            for p, flag in zip(base, root.base_requires_grad):
                p.requires_grad_(flag)
            if model._modules.get(ROOT) is root:
                delattr(model, ROOT)
        else:
            reinstall(model)  # the other deltas' laws, as before
        raise
    return delta


HALF = (torch.float16, torch.bfloat16)


def delta_dtype(base: torch.dtype) -> torch.dtype:
    """The dtype δ gets on a base of dtype ``base``: float32 on a half-precision base, ``base`` otherwise.

    In bfloat16 a weight near 1 is spaced 2⁻⁷ from the next, so a 1e-4 optimiser step of it is lost to rounding;
    in float16 AdamW's ε = 1e-8 is 0, so an entry with a zero gradient (LoRA's A while B = 0) steps by 0/0 = NaN.
    """
    return torch.float32 if base in HALF else base


def use(model, *names: str) -> None:
    """Make exactly the deltas ``names`` active (switch between several trained deltas); no names: disable all."""
    attached = deltas(model)
    unknown = [n for n in names if n not in attached]
    if unknown:
        raise ValueError(f"no delta named {unknown[0]!r} on this model; attached: {', '.join(attached) or 'none'}")
    merged = [d.name for d in attached.values() if d.merged and d.name not in names]
    if merged:
        raise RuntimeError(f"delta {merged[0]!r} is merged into the weights; unmerge it before switching it off")
    for delta in attached.values():
        delta.active = delta.name in names
    reinstall(model, *attached.values())


def penalty(model):
    """Σ R(δ) over the deltas that train (active, not frozen, not merged): add it to the loss. None if none has one."""
    total = None
    for delta in deltas(model).values():
        if delta.active and not delta.frozen and not delta.merged:
            term = delta.controller.penalty()
            if term is not None:
                total = term if total is None else total + term
    return total


def disable_all(model) -> None:
    """No delta acts (the pre-trained model); ``use(model, name)`` switches one back on."""
    use(model)


class disabled:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with disabled(model):`` runs the pre-trained model; the active deltas come back on exit."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = [n for n, d in deltas(self.model).items() if d.active]
        disable_all(self.model)
        return self.model

    def __exit__(self, *exc):
        use(self.model, *self.was)


def reinstall(model, *touched: Delta) -> None:
    """(Re)install the laws of every active, unmerged delta in attachment order; set what trains in ``touched``."""
    attached = deltas(model)
    for delta in reversed(list(attached.values())):
        for handle in reversed(delta._handles):
            handle.remove()
        delta._handles = []
    for delta in attached.values():
        if delta.active and not delta.merged:
            for site, law in delta.controller.controls():  # one at a time: a failure leaves removable handles
                delta._handles.append(delta.backbone.hook(site, law))
    for delta in touched:  # only these: a user may have frozen parts of another delta by hand
        trains = delta.active and not delta.frozen and not delta.merged
        for p in delta.controller.parameters():
            p.requires_grad_(trains)


def _free_name(root, base: str) -> str:
    name, k = base, 1
    while name in root:
        k += 1
        name = f"{base}_{k}"
    return name

