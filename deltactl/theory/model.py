"""The Pontryagin view of a controlled transformer: its blocks as the stages of a ``ControlSystem``.

One recorded forward pass (the loss of a batch) fixes everything the blocks receive besides the residual state:
masks, position biases, the arguments of each stack. Then every stage is re-evaluated on its own, with δ swapped in
functionally (``torch.func.functional_call``), so that grad/vjp/jvp apply to each step map:

    initial   h⁽⁰⁾ = E(δ)                     the stack run up to its first block (embeddings, prompt rows)
    block j   h⁽ʲ⁺¹⁾ = G_j(δ, h⁽ʲ⁾[, e])        the block module itself, with every controller hook inside it
    readout   e = N(δ, h_enc⁽ᴸ⁾)                 T5: the encoder's final norm, read by every cross-attention
    terminal  Φ(δ, h⁽ᴸ⁾)                         the loss, with the last block's output replaced by h⁽ᴸ⁾

For T5 the decoder block stages read e as a second input, so the costate of the encoder's final state is the sum
over decoder blocks of ∂H_j/∂e, pulled back through N (the cross-attention coupling). Nothing depends on the
delta method: a controller acts through the hooks the blocks run, whatever it is.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from deltactl.backbones import backbone_for, compat
from deltactl.theory.system import Controls, ControlSystem, Stage


def default_loss(model, batch):
    """``model(**batch).loss`` (T5 with ``labels``, a transformers task model with ``labels``)."""
    return model(**batch).loss


def trainable_controls(model: nn.Module) -> Controls:
    """δ: the model's parameters that train (after ``attach``: the controller's, plus any task head)."""
    controls = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not controls:
        raise ValueError("the model has no trainable parameters: attach a delta first (deltactl.attach)")
    return controls


class _Apply(nn.Module):
    """Holds the model so that ``functional_call`` can swap its parameters around any function."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(*args)


def call_with(model: nn.Module, controls: Controls, fn: Callable, *args):
    """``fn(*args)`` with the model's parameters named in ``controls`` replaced by those tensors."""
    return functional_call(_Apply(model), {f"model.{k}": v for k, v in controls.items()}, (fn, *args))


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, value):
        self.value = value


def _stack_modules(backbone) -> dict[str, nn.Module]:
    """The module each stack's forward starts from (embeddings and input hooks included)."""
    if backbone.family == "t5":
        model = backbone.model
        stacks = {"encoder": model.encoder}
        if getattr(model, "decoder", None) is not None:
            stacks["decoder"] = model.decoder
        return stacks
    if backbone.family == "bert":
        return {"encoder": backbone.bert}
    if hasattr(backbone, "stack_modules"):  # decoder-only families: the called model, whose hook places prompt rows
        return backbone.stack_modules()
    raise ValueError(f"no Pontryagin view for the {backbone.family} family; known: t5, bert and the decoder-only ones")


def _detach(tree):
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, tree)


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


class _Call:
    """A recorded call of a block or stack: its arguments by name, ready to replay without any cache.

    Positional arguments are bound by the called forward's signature and caches are dropped by type
    (``compat.replay_call``), so a release that renames an argument cannot make a replay reuse a filled cache.
    """

    def __init__(self, module, args, kwargs):
        self.module = module
        self.kwargs = compat.replay_call(module.forward, _detach(args), _detach(kwargs))
        self.hidden_name = next(iter(inspect.signature(module.forward).parameters))

    @property
    def hidden(self):
        return self.kwargs[self.hidden_name]

    def __call__(self, hidden=None, **replace):
        """Run the module on the recorded call with the state (and any named argument) replaced."""
        kwargs = {**self.kwargs, **{_ARGUMENTS[role]: v for role, v in replace.items() if v is not None}}
        recorded = kwargs.pop(self.hidden_name)
        # the state positionally, as the stacks pass it (hooks read args[0])
        return self.module(recorded if hidden is None else hidden, **kwargs)


# What a block stage replaces besides the state, by role: T5Block's cross-attention memory and shared position bias.
_ARGUMENTS = {"memory": "encoder_hidden_states", "bias": "position_bias"}


def model_system(model: nn.Module, batch: dict, loss_fn: Callable = default_loss) -> ControlSystem:
    """The controlled model on one batch as a ``ControlSystem`` whose controls are ``trainable_controls(model)``.

    Args:
        model: a T5, BERT, GPT-2 or Llama model (or a task model holding one, e.g. deltactl's classifier) with deltas
            attached.
        batch: the keyword inputs ``loss_fn`` passes on.
        loss_fn: ``loss_fn(model, batch)`` → scalar loss (the terminal cost Φ); default ``model(**batch).loss``.

    Returns:
        The system; node ``"{stack}.{j}"`` is h⁽ʲ⁾ of that stack, ``"encoder.out"`` the T5 encoder output;
        ``system.recorded`` holds the states of the recorded pass (the rollout, at the current δ).

    Example:
        >>> system = model_system(t5, {**inputs, "labels": y})              # doctest: +SKIP
        >>> view = system.costates(trainable_controls(t5))                  # doctest: +SKIP
    """
    backbone = backbone_for(model)
    training = sorted({type(m).__name__ for m in model.modules() if m.training})
    if training:
        raise ValueError(
            "model_system re-runs each block and needs a deterministic forward, but modules are in training mode "
            f"({', '.join(training[:4])}…): call model.eval() after attaching the deltas (no dropout, no sampling)"
        )
    stacks = _stack_modules(backbone)
    blocks = backbone.blocks()
    calls: dict[str, list[_Call]] = {name: [] for name in blocks}
    stack_calls: dict[str, _Call] = {}
    recorded: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in stacks.items():
        def record_stack(mod, args, kwargs, name=name):
            stack_calls[name] = _Call(mod, args, kwargs)
        handles.append(module.register_forward_pre_hook(record_stack, with_kwargs=True, prepend=True))
        for j, block in enumerate(blocks[name]):
            def record(mod, args, kwargs, name=name):
                calls[name].append(_Call(mod, args, kwargs))
            def record_out(mod, args, out, node=f"{name}.{j + 1}"):
                recorded[node] = _hidden(out).detach()
            handles.append(block.register_forward_pre_hook(record, with_kwargs=True, prepend=True))
            handles.append(block.register_forward_hook(record_out))  # after the controllers' hooks
    try:
        with torch.no_grad():
            recorded_loss = loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    for name in blocks:
        if len(calls[name]) != len(blocks[name]) or name not in stack_calls:
            raise ValueError(
                f"the loss ran the {name} stack {len(calls[name])} times for {len(blocks[name])} blocks; "
                "model_system needs a loss that runs the model's forward once"
            )

    for name in blocks:
        recorded[f"{name}.0"] = calls[name][0].hidden
    coupled = "encoder" in blocks and "decoder" in blocks  # T5: decoder blocks read the encoder output
    if coupled:
        compat.require_arguments(blocks["decoder"][0].forward, _ARGUMENTS["memory"])
        recorded["encoder.out"] = calls["decoder"][0].kwargs[_ARGUMENTS["memory"]]

    stages: list[Stage] = []
    for name, stack_blocks in blocks.items():
        stages.append(Stage(f"{name}.embed", (), f"{name}.0", _initial(model, stack_blocks[0], stack_calls[name])))
        shared_bias = backbone.family == "t5" and len(stack_blocks) > 1
        if shared_bias:  # T5's first block computes the relative position bias every later block reuses
            compat.require_arguments(stack_blocks[1].forward, _ARGUMENTS["bias"])
            recorded[f"{name}.bias"] = calls[name][1].kwargs[_ARGUMENTS["bias"]]
            stages.append(Stage(f"{name}.bias", (), f"{name}.bias", _position_bias(model, stack_blocks[0],
                                                                                     recorded[f"{name}.bias"])))
        for j in range(len(stack_blocks)):
            roles = ["memory"] if coupled and name == "decoder" else []
            roles += ["bias"] if shared_bias and j > 0 else []
            inputs = (f"{name}.{j}", *({"memory": "encoder.out", "bias": f"{name}.bias"}[r] for r in roles))
            stages.append(Stage(f"{name}.{j}", inputs, f"{name}.{j + 1}", _block(model, calls[name][j], tuple(roles))))
        if name == "encoder" and coupled:
            last = f"encoder.{len(stack_blocks)}"
            stages.append(Stage("encoder.final", (last,), "encoder.out", _readout(model, stacks["encoder"])))
    last_stack = list(blocks)[-1]
    last = f"{last_stack}.{len(blocks[last_stack])}"
    stages.append(Stage("loss", (last,), None, _terminal(model, batch, loss_fn, blocks[last_stack][-1])))
    system = ControlSystem(stages, recorded)
    _verify_replay(model, system, recorded_loss)
    return system


def _initial(model, first_block, call):
    def run():
        def stop(mod, args, kwargs):
            raise _Stop(compat.first_argument(mod.forward, args, kwargs))

        handle = first_block.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        try:
            call()
        except _Stop as done:
            return done.value
        finally:
            handle.remove()
        raise RuntimeError("the stack returned without reaching its first block")

    return lambda controls: call_with(model, controls, run)


def _block(model, call, roles):
    def run(hidden, *extra):
        return _hidden(call(hidden, **dict(zip(roles, extra))))

    return lambda controls, hidden, *extra: call_with(model, controls, run, hidden, *extra)


def _position_bias(model, first_block, recorded):
    # The bias depends on δ only where a control acts on the relative position table (a parameter site).
    attention = first_block.layer[0].SelfAttention
    q_len, k_len = recorded.shape[-2:]
    return lambda controls: call_with(model, controls, lambda: compat.relative_position_bias(attention, q_len, k_len))


def _readout(model, encoder):
    # T5Stack ends with final_layer_norm then dropout (identity in eval mode); a bitfit/LN delta acts in the norm.
    return lambda controls, h: call_with(model, controls, lambda x: encoder.dropout(encoder.final_layer_norm(x)), h)


def _terminal(model, batch, loss_fn, last_block):
    def run(h):
        def replace(mod, args, out):
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = last_block.register_forward_hook(replace)  # after every controller hook: h is the final state
        try:
            return loss_fn(model, batch)
        finally:
            handle.remove()

    return lambda controls, h: call_with(model, controls, run, h)


def state_gradients(model: nn.Module, batch: dict, loss_fn: Callable = default_loss) -> dict[str, torch.Tensor]:
    """∂J/∂h⁽ʲ⁾ of every block input and stack output by plain back-propagation through the model's forward.

    The reference the costates are checked against (p⁽ʲ⁾ = −∂J/∂h⁽ʲ⁾); nodes are named as in ``model_system``.
    """
    backbone = backbone_for(model)
    kept: dict[str, torch.Tensor] = {}
    handles = []
    for name, blocks in backbone.blocks().items():
        for j, block in enumerate(blocks):
            def keep_in(mod, args, kwargs, node=f"{name}.{j}"):
                h = compat.first_argument(mod.forward, args, kwargs)
                if h.requires_grad:
                    h.retain_grad()
                else:  # a state δ does not reach (no prompt rows): make it a leaf so J's gradient is kept
                    h = h.detach().requires_grad_()
                    args, kwargs = compat.replace_first_argument(mod.forward, args, kwargs, h)
                kept[node] = h
                return args, kwargs
            handles.append(block.register_forward_pre_hook(keep_in, with_kwargs=True, prepend=True))
        last = f"{name}.{len(blocks)}"

        def keep_out(mod, args, out, node=last):
            _hidden(out).retain_grad()
            kept[node] = _hidden(out)
        handles.append(blocks[-1].register_forward_hook(keep_out))
    try:
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            if not any(h.requires_grad for h in kept.values()):
                raise ValueError("no state depends on a trainable parameter: attach a delta first")
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {k: (v.grad if v.grad is not None else torch.zeros_like(v)).detach() for k, v in kept.items()}


# ---- the replay checks itself against the model's own forward -----------------------------------------------------

_REPLAY_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}  # relative to the largest entry; half: 2e-2
_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _verify_replay(model, system: ControlSystem, loss) -> None:
    """Replay every stage once on the recorded inputs and compare with the model's own forward; loud if different.

    Done once per model and set of controls (and attention implementation): replaying blocks depends on transformers
    internals (argument names, caches, masks), and a replay that reuses state the recorded pass left behind gives
    wrong numbers without failing. Decoder blocks must also read the encoder output they are given (not a cached
    copy): their output has to move when it moves.
    """
    controls = trainable_controls(model)
    key = (tuple(sorted(controls)), tuple(sorted({compat.attention_implementation(m.config) for m in model.modules()
                                                  if hasattr(m, "config") and hasattr(m.config, "model_type")})))
    if key in _verified.setdefault(model, set()):
        return
    recorded = system.recorded
    with torch.no_grad():
        for stage in system.stages:
            args = [recorded[n] for n in stage.inputs]
            try:
                value = stage.step(controls, *args)
            except Exception as error:  # a replay that cannot even run (e.g. a stale cache under eager attention)
                _replay_error(stage.name, f"it raised {type(error).__name__}: {error}", error)
            expected = loss if stage.output is None else recorded[stage.output]
            _compare(stage.name, value, expected)
            if "encoder.out" in stage.inputs and stage.output is not None:
                moved = [a * 1.5 + 0.25 if n == "encoder.out" else a for n, a in zip(stage.inputs, args)]
                if torch.equal(stage.step(controls, *moved), value):
                    _replay_error(stage.name, "its output does not depend on the encoder output it is given "
                                              "(the replay reads a cached cross-attention)")
    _verified[model].add(key)


def _compare(name, value, expected):
    if not isinstance(expected, torch.Tensor):
        return
    value, expected = torch.as_tensor(value, device=expected.device), expected.detach()
    if value.shape != expected.shape:
        _replay_error(name, f"shape {tuple(value.shape)} where the model's forward gave {tuple(expected.shape)}")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (value.to(expected.dtype) - expected).abs().max().item() if expected.numel() else 0.0
    tolerance = _REPLAY_TOLERANCE.get(expected.dtype, 2e-2) * max(scale, 1.0)
    if not error <= tolerance:  # also catches NaN
        _replay_error(name, f"max difference {error:.3g} from the model's own forward (tolerance {tolerance:.3g})")


def _replay_error(stage, what, cause=None):
    raise RuntimeError(
        f"model_system: replaying stage {stage!r} disagrees with the model's own forward: {what}. The block replay "
        f"depends on transformers internals (argument names, caches, masks) and transformers {compat.VERSION} is not "
        "handled correctly by deltactl.backbones.compat; the theory tools would give wrong numbers, so they stop here"
    ) from cause
