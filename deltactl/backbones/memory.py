"""Attention memory: extra key/value rows in any attention that dispatches through transformers' registry.

With memory rows (Kₚ, Vₚ) an attention computes

    softmax([q Kₚᵀ s + bₚ,  q Kᵀ s + b + m]) [Vₚ; V]

(s the family's scaling, b its position bias if any, m the token mask): the rows join the keys and values, every
query sees them, and the token columns keep their mask. A family supplies its eager attention (what "eager"
means for it) and, where its attention carries a position bias over the keys, the bias of the memory columns
(T5's relative bias); families with absolute positions (BERT) give the memory columns no bias.

Mechanism: the config of the attention modules is switched to ``deltactl_<impl>``, registered once per base
implementation, which wraps the base attention function; attentions without memory rows pass straight through.
Every handle's ``remove()`` undoes exactly what it did.
"""

from __future__ import annotations

import torch

from deltactl.backbones import compat

PREFIX = "deltactl_"
_ROWS = "_deltactl_memory"  # on an attention module: its row providers, while memory controllers act there
_WIDEN = "_deltactl_memory_kwargs"  # on an attention module: the family's widening of bias-like kwargs, or None
_BASE, _EAGER, _USERS = "_deltactl_base_impl", "_deltactl_eager", "_deltactl_users"  # on the module's config


class MemoryHandle:
    """Adds a row provider to one attention module and routes its config through the memory-aware attention.

    Args:
        attention: the module handed to the attention function (it holds ``config``).
        control: ``control(batch_size) -> (keys, values)``, each (batch, heads, rows, head_dim).
        eager: the family's eager attention function (used when the base implementation is "eager").
        widen: optional ``widen(module, query, key, n_mem, kwargs) -> kwargs`` extending bias-like keyword
            arguments of the attention function over the memory columns (placed first).
    """

    def __init__(self, attention, control, eager, widen=None):
        self.attention, self.control = attention, control
        providers = attention.__dict__.setdefault(_ROWS, [])
        if not providers:
            attention.__dict__[_WIDEN] = widen
        providers.append(control)
        config = attention.config
        base = compat.attention_implementation(config)
        if not base.startswith(PREFIX):
            compat.register_attention(PREFIX + base, attention_with_memory, like=base)
            config.__dict__[_BASE], config.__dict__[_EAGER] = base, eager
            compat.set_attention_implementation(config, PREFIX + base)
        config.__dict__[_USERS] = config.__dict__.get(_USERS, 0) + 1

    def remove(self):
        providers = self.attention.__dict__[_ROWS]
        providers.remove(self.control)
        if not providers:
            del self.attention.__dict__[_ROWS]
            del self.attention.__dict__[_WIDEN]
        config = self.attention.config
        config.__dict__[_USERS] -= 1
        if config.__dict__[_USERS] == 0:
            compat.set_attention_implementation(config, config.__dict__.pop(_BASE))
            del config.__dict__[_USERS], config.__dict__[_EAGER]


def attention_with_memory(module, query, key, value, attention_mask, **kwargs):
    """The base attention over [Kₚ; K], [Vₚ; V], with the mask (and any family bias) widened over the rows."""
    config = module.config.__dict__
    attend = compat.attention_function(config[_BASE], config[_EAGER])
    providers = module.__dict__.get(_ROWS)
    if not providers:
        return attend(module, query, key, value, attention_mask, **kwargs)
    rows = [provider(query.shape[0]) for provider in providers]
    mem_k = torch.cat([k for k, _ in rows], dim=2).to(key.dtype)
    mem_v = torch.cat([v for _, v in rows], dim=2).to(value.dtype)
    n_mem = mem_k.shape[2]
    widen = module.__dict__[_WIDEN]
    if widen is not None:
        kwargs = widen(module, query, key, n_mem, kwargs)
    attention_mask = mask_with_memory(module, attention_mask, query, key.shape[2], n_mem)
    key, value = torch.cat([mem_k, key], dim=2), torch.cat([mem_v, value], dim=2)
    return attend(module, query, key, value, attention_mask, **kwargs)


def mask_with_memory(module, mask, query, k_len, n_mem):
    """Memory columns are visible to every query; the token columns keep their mask."""
    if mask is None:
        if not (module.is_causal and query.shape[2] > 1):
            return None
        # A causal stack that relied on an implicit mask: spell it out, since the memory breaks the square shape.
        q_len = query.shape[2]
        pos = torch.arange(k_len, device=query.device)
        allowed = pos[None, :] <= torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        mask = torch.zeros(q_len, k_len, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
    mask = mask[..., -k_len:] if mask.shape[-1] > k_len else mask
    visible = True if mask.dtype == torch.bool else 0.0
    pad = mask.new_full((*mask.shape[:-1], n_mem), visible)
    return torch.cat([pad, mask], dim=-1)
