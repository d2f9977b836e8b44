"""What every backbone provides: its canonical sites, hooks that run a controller at a site, a rollout."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import nn

from deltactl.backbones import compat
from deltactl.backbones.parameters import ParameterHandle, parameter_sites
from deltactl.backbones.sites import OUTPUT_KINDS, Site


@dataclass
class Trajectory:
    """Residual states h⁽⁰⁾…h⁽ᴸ⁾ of each stack (h⁽⁰⁾ enters block 0, h⁽ʲ⁺¹⁾ leaves block j) and the outputs."""

    states: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    output: object = None

    def __getitem__(self, stack: str) -> list[torch.Tensor]:
        return self.states[stack]


class Backbone(ABC):
    """A frozen transformers model seen as a controlled dynamical system h⁽ʲ⁺¹⁾ = G⁽ʲ⁾(h⁽ʲ⁾, δ⁽ʲ⁾)."""

    family: str

    def __init__(self, model: nn.Module):
        self.model = model
        sites = self._build_sites()
        canonical = {s.module: s.name for s in sites if s.kind in ("linear", "norm")}
        sites += parameter_sites(model, self.parameter_root(), canonical)
        self.sites: dict[str, Site] = {s.name: s for s in sites}

    @abstractmethod
    def _build_sites(self) -> list[Site]:
        """All canonical sites, in the order the forward pass meets them."""

    def parameter_root(self) -> str:
        """Dotted path of the module whose parameters are the backbone's weights ("" for the whole model)."""
        return ""

    @abstractmethod
    def blocks(self) -> dict[str, list[nn.Module]]:
        """The step maps f⁽ʲ⁾ of each stack, in order."""

    def module(self, site: Site) -> nn.Module:
        return self.model.get_submodule(site.module)

    def weight_target(self, site: Site, attribute: str, law):
        """(module, attribute, law) that merging writes: ``law`` maps the site's weight in nn.Linear layout (out, in)
        or its bias. Families that store weights otherwise (GPT-2's transposed, fused Conv1D) translate the law."""
        return self.module(site), attribute, law

    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table the input sequence is looked up in."""
        return self.model.get_input_embeddings()

    def hook(self, site: Site, control):
        """Run ``control`` at ``site``; returns a handle whose ``remove()`` undoes it exactly.

        A law at a linear site that declares ``acts_on = "input"`` maps the layer's input instead, x' = G(x)
        (IA3's scaling of the FFN activations is one).
        """
        if site.kind == "linear" and getattr(control, "acts_on", "output") == "input":
            return self.module(site).register_forward_pre_hook(_input_hook(control))
        if site.kind == "state" and hasattr(control, "see_tokens"):
            return _Handles(
                self.token_module(site.stack).register_forward_pre_hook(_tokens_hook(control), with_kwargs=True),
                self.module(site).register_forward_hook(_output_hook(control)),
            )
        if site.kind in OUTPUT_KINDS:
            return self.module(site).register_forward_hook(_output_hook(control))
        if site.kind == "parameter":
            return ParameterHandle(self.model, site, control)
        raise ValueError(f"{self.family} backbone has no {site.kind} mechanism for site {site.name!r}")

    def token_module(self, stack: str) -> nn.Module:
        """The module that takes ``stack``'s tokens (ids and the 2-D attention mask): the innermost module above its
        blocks whose forward has both ``input_ids`` and ``attention_mask`` (T5's stacks, BertModel, GPT2Model,
        LlamaModel). Its ``attention_mask`` is the stack's: T5's decoder stack receives ``decoder_attention_mask``."""
        first = self.blocks()[stack][0]
        path = next(name for name, m in self.model.named_modules() if m is first)
        while path:
            path = path.rpartition(".")[0]
            module = self.model.get_submodule(path)
            params = inspect.signature(module.forward).parameters
            if "input_ids" in params and "attention_mask" in params:
                return module
        raise ValueError(f"{self.family}: no module above the {stack} blocks takes input_ids and attention_mask")

    def rollout(self, **inputs) -> Trajectory:
        """Run the model once and record the residual trajectory of every stack."""
        traj = Trajectory()
        handles = []
        for stack, blocks in self.blocks().items():
            states = traj.states.setdefault(stack, [])
            handles.append(blocks[0].register_forward_pre_hook(_record_input(states), with_kwargs=True))
            handles += [b.register_forward_hook(_record_output(states)) for b in blocks]
        try:
            traj.output = self.model(**inputs)
        finally:
            for h in handles:
                h.remove()
        for stack, blocks in self.blocks().items():
            states = traj.states[stack]
            if states and len(states) != len(blocks) + 1:  # a stack that did not run records nothing
                raise RuntimeError(
                    f"rollout recorded {len(states)} {stack} states for {len(blocks)} blocks (expected "
                    f"{len(blocks) + 1}): the forward pass ran {stack} blocks more than once or skipped some "
                    f"(transformers {compat.VERSION}); pass the inputs of one full forward pass"
                )
        return traj


def _output_hook(control):
    # The hooked value is the module's output, or the first entry when the module returns a tuple.
    def hook(module, args, output):
        x = args[0] if args else None
        if isinstance(output, tuple):
            return (control(x, output[0]), *output[1:])
        return control(x, output)

    return hook


# ---- token positions: what a law at a state site may know about the tokens of the pass --------------------------
#
# A law at a ``state`` site that has a method ``see_tokens(mask, past)`` is shown, before every pass of its stack,
# the 2-D attention mask that pass received (None when the model was called without one: every token is real) and
# the number of positions a key/value cache already held (0 unless decoding continues a cached sequence). The law
# keeps what it was shown and reads it when it is called at its block, so it can act at chosen token positions (the
# ReFT methods act on the first and last real tokens). The pre-hook sits on the stack's ``token_module``, and the
# handle removes it with the law's own hook. Replaying a block alone (``deltactl.theory.model_system``) reuses the
# mask of the stack's last pass, which is the pass being replayed. Laws without ``see_tokens`` are hooked as before.


def _tokens_hook(control):
    def hook(module, args, kwargs):
        bound = compat.bind_call(module.forward, args, kwargs)
        control.see_tokens(bound.get("attention_mask"), compat.cache_length(bound.values()))

    return hook


class _Handles:
    """Several hook handles removed as one, last first."""

    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for handle in reversed(self.handles):
            handle.remove()


def _input_hook(control):
    def hook(module, args):
        return (control(args[0]), *args[1:])

    return hook


def _record_input(states):
    def hook(module, args, kwargs):
        states.append(compat.first_argument(module.forward, args, kwargs))

    return hook


def _record_output(states):
    def hook(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    return hook
