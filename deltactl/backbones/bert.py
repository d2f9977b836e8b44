"""BERT (``BertModel`` and the task models that hold one) mapped onto canonical sites.

BERT is post-LN: block j maps h to u = LN₁(h + F_attn(h)), then h⁽ʲ⁺¹⁾ = LN₂(u + F_ffn(u)), so the states
entering each sub-layer are already normalised. Per layer ``j`` of the stack ``encoder``:

- ``encoder.j.attn.{q,k,v,o}`` (query, key, value, attention output dense), ``encoder.j.ffn.{wi,wo}``: linear
- ``encoder.j.attn.kv``: attention memory (extra key/value rows; BERT's positions are absolute, so the rows
  carry no position: only the tokens' embeddings do)
- ``encoder.j.{attn,ffn}.out``: the sub-layer's update F (after its dropout, before the residual add and LN);
  the controller receives (h, F(h)) with h the sub-layer input
- ``encoder.j.{attn,ffn}.ln``: the post-LN layer norms LN₁, LN₂
- ``encoder.j.out``: the residual stream leaving block j
- ``encoder.embed``: the input sequence; ``encoder.embed_ln``: the embedding layer norm

Soft prompt rows (``encoder.embed``) take the place of word embeddings, as in PEFT: they are placed before the
tokens' word embeddings, then the position embeddings of 0…p−1 and token type 0 are added and the embedding norm
applies to them like to any token; the tokens move to positions p…p+T−1. So rows equal to the word embeddings
of t₁…tₚ are exactly the model run on [t₁…tₚ; x]. ``attention_mask`` is widened with ones, ``token_type_ids``
with zeros, and given ``position_ids`` become [0…p−1; position_ids + p].
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertModel

from deltactl.backbones import compat
from deltactl.backbones.base import Backbone
from deltactl.backbones.memory import MemoryHandle
from deltactl.backbones.sites import Site


class BertBackbone(Backbone):
    family = "bert"

    def __init__(self, model: nn.Module):
        self.path, self.bert = _find_bert(model)
        super().__init__(model)

    def blocks(self):
        return {"encoder": list(self.bert.encoder.layer)}

    def parameter_root(self):
        return self.path  # a task model's head is not part of the backbone

    def _build_sites(self):
        cfg = self.bert.config
        if cfg.is_decoder or cfg.add_cross_attention:
            raise ValueError("deltactl's BERT backbone covers BERT as an encoder: is_decoder=False, no cross-attention")
        d, d_ff, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
        at = f"{self.path}." if self.path else ""
        sites = [
            Site("encoder.embed", "sequence", self.path, {"d": d}),
            Site("encoder.embed_ln", "norm", f"{at}embeddings.LayerNorm", {"d": d}),
        ]
        for j, layer in enumerate(self.bert.encoder.layer):
            lay, pre = f"{at}encoder.layer.{j}", f"encoder.{j}"
            attn = layer.attention.self
            inner, head_dim = attn.all_head_size, attn.attention_head_size
            for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
                dims = {"in": d, "out": inner}
                sites.append(Site(f"{pre}.attn.{proj}", "linear", f"{lay}.attention.self.{name}", dims))
            memory = {"heads": heads, "head_dim": head_dim, "d_model": d}
            sites += [
                Site(f"{pre}.attn.kv", "memory", f"{lay}.attention.self", memory),
                Site(f"{pre}.attn.o", "linear", f"{lay}.attention.output.dense", {"in": inner, "out": d}),
                Site(f"{pre}.attn.out", "branch", f"{lay}.attention.output.dropout", {"d": d}),
                Site(f"{pre}.attn.ln", "norm", f"{lay}.attention.output.LayerNorm", {"d": d}),
                Site(f"{pre}.ffn.wi", "linear", f"{lay}.intermediate.dense", {"in": d, "out": d_ff}),
                Site(f"{pre}.ffn.wo", "linear", f"{lay}.output.dense", {"in": d_ff, "out": d}),
                Site(f"{pre}.ffn.out", "branch", f"{lay}.output.dropout", {"d": d}),
                Site(f"{pre}.ffn.ln", "norm", f"{lay}.output.LayerNorm", {"d": d}),
                Site(f"{pre}.out", "state", lay, {"d": d}),
            ]
        return sites

    def hook(self, site, control):
        if site.kind == "memory":
            return MemoryHandle(self.module(site), control, compat.eager_attention("bert"))
        if site.kind == "sequence":
            return self.bert.register_forward_pre_hook(_prepend_rows(control), with_kwargs=True)
        if site.kind == "branch":
            return _BranchHandle(self.model.get_submodule(site.module.rsplit(".", 1)[0]), control)
        return super().hook(site, control)


def _find_bert(model: nn.Module) -> tuple[str, BertModel]:
    """The dotted path of the BertModel in ``model`` ("" for a BertModel itself) and the module."""
    for name, module in model.named_modules():
        if isinstance(module, BertModel):
            return name, module
    raise ValueError(f"{type(model).__name__} holds no BertModel")


class _BranchHandle:
    """G(h, F(h)) at a sub-layer output (BertSelfOutput, BertOutput): F is its dropout's output, h its input_tensor.

    A pre-hook on the output module keeps h (the residual input, passed as ``input_tensor``) until the
    dropout's forward hook replaces F(h) by the control law's value; the sum and LayerNorm follow unchanged.
    """

    def __init__(self, output: nn.Module, control):
        kept = []

        def keep(module, args, kwargs):
            kept.append(args[1] if len(args) > 1 else kwargs["input_tensor"])

        def apply(module, args, update):
            return control(kept.pop(), update)

        self.handles = [
            output.register_forward_pre_hook(keep, with_kwargs=True),
            output.dropout.register_forward_hook(apply),
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def _prepend_rows(control):
    """Pre-hook on BertModel: [rows; word embeddings] as inputs_embeds, with mask, token types, positions widened."""

    def hook(bert, args, kwargs):
        kwargs = compat.bind_call(bert.forward, args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = bert.embeddings.word_embeddings(kwargs["input_ids"])
        rows = control(embeds).to(embeds.dtype)
        batch, p = rows.shape[:2]
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([rows, embeds], dim=1), None
        if kwargs.get("attention_mask") is not None:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, p), mask], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], p), types], dim=1)
        if kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"]
            first = torch.arange(p, dtype=pos.dtype, device=pos.device).expand(pos.shape[0], p)
            kwargs["position_ids"] = torch.cat([first, pos + p], dim=1)
        return (), kwargs

    return hook
