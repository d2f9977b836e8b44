"""What decoder-only language models (GPT-2, the Llama family) share: one causal stack called ``decoder``.

A decoder-only model is the dynamical system of one stack: h⁽⁰⁾ are the token embeddings (plus GPT-2's absolute
positions), block j maps h⁽ʲ⁾ to h⁽ʲ⁺¹⁾, and the final norm and the LM head read h⁽ᴸ⁾. The families differ in
their sites (``gpt2.py``, ``llama.py``); the mechanisms here are common to both:

- the sequence site ``decoder.embed``: rows placed before the tokens' embeddings, as PEFT's prompt tuning places
  them. A pre-hook on the model the user calls puts [rows; embeddings] in place of ``input_ids``, widens
  ``attention_mask`` with ones, gives the rows positions 0…p−1 and the tokens p…p+T−1 (given ``position_ids``
  are shifted by p; without them the model counts from 0 over rows and tokens), and widens ``labels`` with −100,
  so the rows predict nothing but the last of them predicts the first token. The outputs cover rows and tokens
  (logits of length p+T). Called with a filled key/value cache (incremental decoding), the rows are in the cache
  already: nothing is placed, the mask is widened and given positions shifted, so decoding with a cache equals
  decoding without one;
- memory sites ``decoder.j.attn.kv``: the shared attention memory (``memory.py``); the rows carry no position
  (GPT-2's positions enter at the embeddings; Llama's rotary rotation is not applied to them), and the tokens keep
  positions 0…T−1. PEFT passes prefixes as a key/value cache instead, which moves the tokens to p…p+T−1: the
  cross-checks give deltactl those positions to compare like with like;
- branch sites ``decoder.j.{attn,ffn}.out``: the sub-layer's update F(x) on the normalised input x, before the
  residual add, with x read by the called forward's signature (Llama passes it by keyword).
"""

from __future__ import annotations

import torch
from torch import nn

from deltactl.backbones import compat
from deltactl.backbones.base import Backbone
from deltactl.backbones.memory import MemoryHandle

IGNORE_INDEX = -100  # the label transformers' causal LM loss skips


class DecoderOnlyBackbone(Backbone):
    """A causal LM (``…ForCausalLM``) or its bare stack (``…Model``) as one stack ``decoder``."""

    stack_class: type  # the family's bare model class (GPT2Model, LlamaModel)

    def __init__(self, model: nn.Module):
        self.path, self.stack = _find(model, self.stack_class)
        self.at = f"{self.path}." if self.path else ""
        super().__init__(model)

    def parameter_root(self):
        return ""  # the LM head is pre-trained (and often tied to the embedding): it is part of the backbone

    def stack_modules(self) -> dict[str, nn.Module]:
        """The module whose call starts the stack, input hooks included: the model the user calls."""
        return {"decoder": self.model}

    def input_embeddings(self) -> nn.Embedding:
        return self.stack.get_input_embeddings()

    def hook(self, site, control):
        if site.kind == "memory":
            return MemoryHandle(self.module(site), control, compat.eager_attention(self.family))
        if site.kind == "sequence":
            return self.model.register_forward_pre_hook(_prepend_rows(self, control), with_kwargs=True)
        if site.kind == "branch":
            return self.module(site).register_forward_hook(_branch_hook(control), with_kwargs=True)
        return super().hook(site, control)


def _find(model: nn.Module, cls: type) -> tuple[str, nn.Module]:
    for name, module in model.named_modules():
        if isinstance(module, cls):
            return name, module
    raise ValueError(f"{type(model).__name__} holds no {cls.__name__}")


def _branch_hook(control):
    def hook(module, args, kwargs, output):
        x = compat.first_argument(module.forward, args, kwargs)
        if isinstance(output, tuple):
            return (control(x, output[0]), *output[1:])
        return control(x, output)

    return hook


def _prepend_rows(backbone: DecoderOnlyBackbone, control):
    """Pre-hook on the called model: [rows; embeddings], with mask, positions and labels widened (module docstring)."""

    def hook(model, args, kwargs):
        kwargs = compat.bind_call(model.forward, args, kwargs)
        embeds, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        if kwargs.get("token_type_ids") is not None:
            raise ValueError("deltactl's input rows (decoder.embed) do not take token_type_ids on a decoder-only model")
        if embeds is None:
            embeds = backbone.input_embeddings()(ids)
        rows = control(embeds).to(embeds.dtype)
        batch, p = rows.shape[:2]
        continuing = compat.cache_length(kwargs.values()) > 0  # the rows went into the cache with the first call
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("deltactl's input rows (decoder.embed) need a 2-D attention_mask (batch, length)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        pos = kwargs.get("position_ids")
        if continuing:
            if pos is not None:
                kwargs["position_ids"] = pos + p
            return (), kwargs
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([rows, embeds], dim=1), None
        if pos is not None:
            first = torch.arange(p, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], p)
            kwargs["position_ids"] = torch.cat([first, pos + p], dim=1)
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], p), IGNORE_INDEX), labels], dim=1)
        return (), kwargs

    return hook
