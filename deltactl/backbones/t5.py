"""T5 (v1.0 and v1.1, encoder–decoder or encoder-only) mapped onto canonical sites.

Per layer ``j`` of ``encoder`` and ``decoder``:

- ``{stack}.j.attn.{q,k,v,o}``, ``decoder.j.cross.{q,k,v,o}``, ``{stack}.j.ffn.{wi|wi_0,wi_1,wo}``: linear
- ``{stack}.j.attn.kv``, ``decoder.j.cross.kv``: attention memory (extra key/value rows, e.g. prefixes)
- ``{stack}.j.{attn,cross,ffn}.ln``, ``{stack}.final_ln``: RMS layer norms
- ``{stack}.j.{attn,cross,ffn}.out``: the sub-layer's update F(h), before it joins the residual stream
- ``{stack}.j.out``: the residual stream leaving block j
- ``encoder.embed``: the input sequence (extra rows placed before the tokens, e.g. soft prompts)
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.backbones import compat
from deltactl.backbones.base import Backbone
from deltactl.backbones.memory import MemoryHandle
from deltactl.backbones.sites import Site


class T5Backbone(Backbone):
    family = "t5"

    def blocks(self):
        return {name: list(stack.block) for name, stack in self._stacks().items()}

    def _stacks(self) -> dict[str, nn.Module]:
        stacks = {"encoder": self.model.encoder}
        if getattr(self.model, "decoder", None) is not None:
            stacks["decoder"] = self.model.decoder
        return stacks

    def _build_sites(self):
        cfg = self.model.config
        d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
        memory = {"heads": cfg.num_heads, "head_dim": cfg.d_kv, "d_model": d}
        sites = [Site("encoder.embed", "sequence", "encoder", {"d": d})]
        for stack_name, stack in self._stacks().items():
            for j, block in enumerate(stack.block):
                at = f"{stack_name}.block.{j}"
                parts = [("attn", f"{at}.layer.0", "SelfAttention")]
                if stack_name == "decoder":
                    parts.append(("cross", f"{at}.layer.1", "EncDecAttention"))
                for part, layer, attn in parts:
                    pre = f"{stack_name}.{j}.{part}"
                    sites.append(Site(f"{pre}.ln", "norm", f"{layer}.layer_norm", {"d": d}))
                    for proj in "qkv":
                        sites.append(Site(f"{pre}.{proj}", "linear", f"{layer}.{attn}.{proj}", {"in": d, "out": inner}))
                    sites.append(Site(f"{pre}.kv", "memory", f"{layer}.{attn}", dict(memory)))
                    sites.append(Site(f"{pre}.o", "linear", f"{layer}.{attn}.o", {"in": inner, "out": d}))
                    sites.append(Site(f"{pre}.out", "branch", f"{layer}.{attn}", {"d": d}))
                ffn = f"{at}.layer.{len(block.layer) - 1}"
                pre = f"{stack_name}.{j}.ffn"
                sites.append(Site(f"{pre}.ln", "norm", f"{ffn}.layer_norm", {"d": d}))
                dense = block.layer[-1].DenseReluDense
                for proj in ("wi_0", "wi_1") if hasattr(dense, "wi_0") else ("wi",):
                    dims = {"in": d, "out": cfg.d_ff}
                    sites.append(Site(f"{pre}.{proj}", "linear", f"{ffn}.DenseReluDense.{proj}", dims))
                sites.append(Site(f"{pre}.wo", "linear", f"{ffn}.DenseReluDense.wo", {"in": cfg.d_ff, "out": d}))
                sites.append(Site(f"{pre}.out", "branch", f"{ffn}.DenseReluDense", {"d": d}))
                sites.append(Site(f"{stack_name}.{j}.out", "state", at, {"d": d}))
            sites.append(Site(f"{stack_name}.final_ln", "norm", f"{stack_name}.final_layer_norm", {"d": d}))
        return sites

    def hook(self, site, control):
        if site.kind == "memory":
            attention = self.module(site)
            source = self.relative_bias_source(attention)
            table = None if source is None else _BiasTable.acquire(self._stack_of(attention), source)
            widen = partial(_widen_position_bias, source, table)
            return _MemoryHandle(MemoryHandle(attention, control, compat.eager_attention("t5"), widen), table)
        if site.kind == "sequence":
            return _SequenceHandle(self, control)
        return super().hook(site, control)

    def relative_bias_source(self, attention: nn.Module) -> nn.Module | None:
        """The layer-0 self-attention holding the relative position table this attention uses."""
        for stack in self._stacks().values():
            first = stack.block[0].layer[0].SelfAttention
            if any(attention is b.layer[0].SelfAttention for b in stack.block):
                return first
        return None  # cross-attention: T5 gives it no position bias

    def _stack_of(self, attention: nn.Module) -> nn.Module:
        return next(stack for stack in self._stacks().values()
                    if any(attention is b.layer[0].SelfAttention for b in stack.block))


# ---- attention memory: the shared mechanism, with T5's relative position bias over the memory columns ----------


def _widen_position_bias(source, table, module, query, key, n_mem, kwargs):
    """[bₚ, b]: the position bias of the memory columns joins T5's bias over the tokens."""
    position_bias = kwargs.get("position_bias")
    if position_bias is None:
        return kwargs
    mem_bias = _memory_bias(module, source, table, query.shape[2], key.shape[2], n_mem, query)
    mem_bias = mem_bias.expand(position_bias.shape[0], -1, -1, -1)
    return {**kwargs, "position_bias": torch.cat([mem_bias.to(position_bias.dtype), position_bias], dim=-1)}


def _memory_bias(module, source, table, q_len, k_len, n_mem, query):
    """Relative position bias of the memory columns: the rows sit just before the first token.

    This is where an autoregressive cache would put them, so decoder prefixes match prefixes passed as a
    key/value cache (PEFT's placement); cross-attention carries no position bias in T5. The bias is looked up in
    the copy of the relative position table the stack's first block made in this forward pass (``_BiasTable``), so
    later blocks never read the first block's parameters; a block run on its own reads them.
    """
    shape = (1, module.n_heads, q_len, n_mem)
    if source is None:
        return query.new_zeros(shape)
    past = k_len - q_len  # tokens already cached in front of the queries
    context = torch.arange(q_len, device=query.device)[:, None] + past
    memory = torch.arange(n_mem, device=query.device)[None, :] - n_mem
    buckets = compat.relative_position_bucket(source, memory - context, bidirectional=not source.is_decoder)
    rows = table.rows if table is not None else None
    values = source.relative_attention_bias(buckets) if rows is None else F.embedding(buckets, rows)
    return values.permute(2, 0, 1).unsqueeze(0)


class _BiasTable:
    """The relative position table of a stack's first self-attention, copied while that block runs.

    T5 keeps the table in block 0 and hands its bias over the tokens to the later blocks; the memory columns need
    other relative positions, which the later blocks look up here rather than in block 0's weight. With each block
    its own FSDP unit, that weight is resharded once block 0 has run, and reading it from block 1 would mix a
    gathered tensor with a sharded one. The copy (``embedding(arange(buckets))``: the rows themselves, bit for bit,
    in the autograd graph) is made only inside a forward pass of the stack and dropped when the stack returns, so
    a block called on its own (the theory tools' step maps) reads the weight it is called with, as before.

    One table per stack, shared by every memory handle of the stack and removed with the last one.
    """

    _KEY = "_deltactl_bias_table"  # on the first self-attention, while memory handles of its stack exist

    def __init__(self, stack: nn.Module, source: nn.Module):
        self.source, self.users, self.running, self.rows = source, 0, False, None
        self.handles = [
            stack.register_forward_pre_hook(self._start),
            stack.register_forward_hook(self._stop, always_call=True),  # also when the forward pass raises
            source.register_forward_pre_hook(self._copy),
        ]

    @classmethod
    def acquire(cls, stack: nn.Module, source: nn.Module) -> _BiasTable:
        table = source.__dict__.get(cls._KEY)
        if table is None:
            table = source.__dict__[cls._KEY] = cls(stack, source)
        table.users += 1
        return table

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            for handle in self.handles:
                handle.remove()
            del self.source.__dict__[self._KEY]

    def _start(self, stack, args):
        self.running, self.rows = True, None

    def _stop(self, stack, args, output):
        self.running, self.rows = False, None

    def _copy(self, attention, args):
        if self.running:
            embedding = attention.relative_attention_bias
            ids = torch.arange(embedding.num_embeddings, device=embedding.weight.device)
            self.rows = embedding(ids)


class _MemoryHandle:
    """The shared memory handle, plus this handle's share of its stack's bias table."""

    def __init__(self, handle: MemoryHandle, table: _BiasTable | None):
        self.handle, self.table = handle, table

    def remove(self):
        self.handle.remove()
        if self.table is not None:
            self.table.release()
            self.table = None


# ---- input sequence: rows placed before the encoder's tokens ------------------------------------------


class _SequenceHandle:
    """Prepends rows to the encoder input and widens the masks that must see them."""

    def __init__(self, backbone: T5Backbone, control):
        stacks = backbone._stacks()
        self.handles = [stacks["encoder"].register_forward_pre_hook(_prepend_rows(control), with_kwargs=True)]
        if "decoder" in stacks:
            self.handles.append(stacks["decoder"].register_forward_pre_hook(_widen_encoder_mask, with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def _prepend_rows(control):
    def hook(stack, args, kwargs):
        kwargs = compat.bind_call(stack.forward, args, kwargs)
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = stack.embed_tokens(kwargs["input_ids"])
        rows = control(embeds).to(embeds.dtype)
        kwargs["inputs_embeds"], kwargs["input_ids"] = torch.cat([rows, embeds], dim=1), None
        mask = kwargs.get("attention_mask")
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], rows.shape[1]), mask], dim=1)
        return (), kwargs

    return hook


def _widen_encoder_mask(stack, args, kwargs):
    kwargs = compat.bind_call(stack.forward, args, kwargs)
    states, mask = kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")
    if states is not None and mask is not None and mask.shape[1] < states.shape[1]:
        extra = mask.new_ones(mask.shape[0], states.shape[1] - mask.shape[1])
        kwargs["encoder_attention_mask"] = torch.cat([extra, mask], dim=1)
    return (), kwargs
