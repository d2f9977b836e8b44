"""The one place deltactl touches transformers internals.

transformers renames internals in minor releases (5.24 renamed the cache argument ``past_key_values`` → ``cache``
of every T5 and BERT module). Everything below the public ``from transformers import …`` surface that deltactl
uses is reached through this module, so that a rename is fixed here once and is seen here first:

- attention: the per-family eager attention functions, the registries of attention and mask functions, the
  attention implementation a config selects;
- T5 internals: the relative position buckets and bias of an attention module;
- activations by name;
- calls recorded by hooks: binding positional arguments to names by the called function's signature, and
  preparing a call to be replayed (cache objects dropped by type, ``use_cache=False``), so that no argument is
  ever found by a name that a release may change.

Tested range: see ``pyproject.toml`` (floors) and ``constraints.txt`` (the locked versions).
"""

from __future__ import annotations

import inspect

import transformers
from transformers import AttentionInterface
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert import modeling_bert
from transformers.models.gpt2 import modeling_gpt2
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.t5 import modeling_t5
from transformers.pytorch_utils import Conv1D

VERSION = transformers.__version__

__all__ = [
    "ACT2FN", "Conv1D", "VERSION", "attention_function", "attention_implementation", "bind_call", "cache_length",
    "eager_attention",
    "first_argument", "is_cache", "register_attention", "relative_position_bias", "relative_position_bucket",
    "replace_first_argument", "replay_call", "require_arguments", "set_attention_implementation",
]


# ---- attention ----------------------------------------------------------------------------------------------------

# family → its modeling classes' prefix
_EAGER = {"t5": "T5", "bert": "Bert", "gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
_MODELING = {"t5": modeling_t5, "bert": modeling_bert, "gpt2": modeling_gpt2, "llama": modeling_llama,
             "mistral": modeling_mistral, "qwen2": modeling_qwen2}


def eager_attention(family: str):
    """The family's eager attention function ``(module, query, key, value, mask, **kwargs) -> (out, weights)``."""
    module = _MODELING[family]
    function = getattr(module, "eager_attention_forward", None)
    if function is None:
        raise ImportError(
            f"transformers {VERSION} has no eager_attention_forward in its {_EAGER[family]} model: deltactl's "
            "attention mechanisms need a release whose attention dispatches through AttentionInterface "
            "(see the floors in deltactl's pyproject.toml)"
        )
    return function


def attention_implementation(config) -> str:
    """The attention implementation a model config selects ("eager", "sdpa", a registered name)."""
    return config._attn_implementation


def set_attention_implementation(config, name: str) -> None:
    """Select a registered attention implementation on one config object (the modules holding it follow)."""
    config._attn_implementation = name


def attention_function(name: str, default):
    """The registered attention function ``name`` ("eager" maps to ``default``, the family's own)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, default)


def register_attention(name: str, function, like: str) -> None:
    """Register ``function`` as attention ``name``, with the mask construction of the implementation ``like``."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[like])


# ---- T5 relative positions ----------------------------------------------------------------------------------------


def relative_position_bucket(attention, relative_position, bidirectional: bool):
    """T5's bucket of each relative position (key − query), with the attention module's bucket settings."""
    return attention._relative_position_bucket(
        relative_position,
        bidirectional=bidirectional,
        num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance,
    )


def relative_position_bias(attention, query_length: int, key_length: int):
    """The (1, heads, q, k) position bias a T5 attention holding the relative table computes, nothing cached."""
    return attention.compute_bias(query_length, key_length)


# ---- GPT-2's Conv1D ----------------------------------------------------------------------------------------------

# GPT-2's projections are ``Conv1D`` layers: y = x W + b with W stored (in, out), the transpose of nn.Linear's.


# ---- activations -------------------------------------------------------------------------------------------------


# ACT2FN maps an activation name ("relu", "gelu_new", "silu", …) to its module; re-exported from here.


# ---- recorded calls ----------------------------------------------------------------------------------------------


def bind_call(function, args, kwargs) -> dict:
    """``function``'s arguments of a call by name: positional ones bound by its signature, ``**kwargs`` flattened.

    ``function`` is the called forward (a bound method); raises TypeError naming the transformers version when
    the call does not fit the signature.
    """
    signature = inspect.signature(function)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"a recorded call does not fit {_name(function)}{signature} (transformers {VERSION}): "
                        f"{error}") from error
    named = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{_name(function)} takes *{name}; deltactl cannot bind a recorded call to it")
        else:
            named[name] = value
    return named


def first_argument(function, args, kwargs):
    """The value of ``function``'s first parameter in a call (the hidden state, for a block or a stack's layer)."""
    if args:
        return args[0]
    first = next(iter(inspect.signature(function).parameters))
    return kwargs[first]


def replace_first_argument(function, args, kwargs, value):
    """(args, kwargs) of a call with ``function``'s first parameter set to ``value``, wherever it was passed."""
    if args:
        return (value, *args[1:]), kwargs
    return args, {**kwargs, next(iter(inspect.signature(function).parameters)): value}


def require_arguments(function, *names: str) -> None:
    """Raise a clear error when ``function`` (a block's forward) has no parameter called one of ``names``."""
    parameters = inspect.signature(function).parameters
    missing = [n for n in names if n not in parameters]
    if missing:
        raise TypeError(
            f"{_name(function)} has no argument {', '.join(map(repr, missing))} in transformers {VERSION} "
            f"(it takes {', '.join(parameters)}): deltactl.backbones.compat needs updating for this release"
        )


def replay_call(function, args, kwargs) -> dict:
    """The keyword arguments that replay a recorded call of ``function`` without any cache.

    Cache objects are dropped wherever they sit (found by type, whatever the argument is called in this release),
    and ``use_cache=False`` is passed where the function takes it, so the replay recomputes every key and value
    instead of appending to a cache the recorded pass filled.
    """
    named = {k: v for k, v in bind_call(function, args, kwargs).items() if not is_cache(v)}
    if "use_cache" in inspect.signature(function).parameters:
        named["use_cache"] = False
    return named


def is_cache(value) -> bool:
    """Whether ``value`` is a transformers cache object (any ``Cache``, including encoder–decoder caches)."""
    return isinstance(value, Cache)


def cache_length(values) -> int:
    """How many positions the cache objects among ``values`` already hold (0 when there is none, or all are empty).

    A decoder-only model called with a filled cache continues a sequence (incremental decoding): rows placed before
    the sequence are in the cache already and must not be placed again.
    """
    return max((v.get_seq_length() for v in values if is_cache(v)), default=0)


def _name(function) -> str:
    owner = getattr(function, "__self__", None)
    return f"{type(owner).__name__}.forward" if owner is not None else getattr(function, "__qualname__", "?")
