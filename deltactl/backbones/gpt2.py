"""GPT-2 (``GPT2LMHeadModel``, ``GPT2Model``) mapped onto canonical sites.

GPT-2 is pre-LN: block j maps h to u = h + F_attn(LN₁(h)), then h⁽ʲ⁺¹⁾ = u + F_ffn(LN₂(u)). Per layer ``j`` of
the one stack ``decoder``:

- ``decoder.j.attn.{q,k,v}``: linear, the three output slices of the fused projection ``c_attn`` (columns
  0…d−1, d…2d−1, 2d…3d−1 of its output), each its own site, as the LoRA paper tuned GPT-2's q and v;
  ``decoder.j.attn.qkv``: linear, ``c_attn`` as a whole (the module PEFT targets on GPT-2, one update over all
  3d outputs); ``decoder.j.attn.o`` (``attn.c_proj``), ``decoder.j.ffn.wi`` (``c_fc``), ``decoder.j.ffn.wo``
  (``mlp.c_proj``): linear. The layers are ``Conv1D`` (y = x W + b, W stored (in, out)); the laws see x and y
  only, so they do not depend on the storage. A law acting on a layer's input (``acts_on = "input"``) is refused
  at a slice, whose input is shared by q, k and v
- ``decoder.j.attn.kv``: attention memory (extra key/value rows; they carry no position)
- ``decoder.j.{attn,ffn}.ln``: the pre-LN layer norms ``ln_1``, ``ln_2``; ``decoder.final_ln``: ``ln_f``
- ``decoder.j.{attn,ffn}.out``: the sub-layer's update F(x) (after its dropout, before the residual add)
- ``decoder.j.out``: the residual stream leaving block j
- ``decoder.embed``: the input sequence (rows before the tokens; see ``decoder_only.py``)

Parameter sites are named after the canonical site of their module (``decoder.0.attn.qkv.weight``, stored (in, out)
as the model holds it); the embeddings keep their transformers names (``transformer.wte.weight``, tied to the LM head,
is one site acting in both).
"""

from __future__ import annotations

import torch
from transformers import GPT2Model

from deltactl.backbones import compat
from deltactl.backbones.decoder_only import DecoderOnlyBackbone
from deltactl.backbones.sites import Site


class GPT2Backbone(DecoderOnlyBackbone):
    family = "gpt2"
    stack_class = GPT2Model

    def blocks(self):
        return {"decoder": list(self.stack.h)}

    def _build_sites(self):
        cfg = self.stack.config
        if cfg.add_cross_attention:
            raise ValueError("deltactl's GPT-2 backbone covers GPT-2 as a decoder-only LM: add_cross_attention=False")
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        d_ff = cfg.n_inner if cfg.n_inner is not None else 4 * d
        at = self.at
        sites = [Site("decoder.embed", "sequence", self.path, {"d": d})]
        for j in range(len(self.stack.h)):
            lay, pre = f"{at}h.{j}", f"decoder.{j}"
            attn = f"{lay}.attn"
            sites.append(Site(f"{pre}.attn.ln", "norm", f"{lay}.ln_1", {"d": d}))
            for i, proj in enumerate("qkv"):
                dims = {"in": d, "out": d, "slice": (i * d, (i + 1) * d), "of": f"{pre}.attn.qkv"}
                sites.append(Site(f"{pre}.attn.{proj}", "linear", f"{attn}.c_attn", dims))
            # after its slices: the fused layer's parameters take this name (decoder.j.attn.qkv.weight)
            sites.append(Site(f"{pre}.attn.qkv", "linear", f"{attn}.c_attn", {"in": d, "out": 3 * d}))
            sites += [
                Site(f"{pre}.attn.kv", "memory", attn, {"heads": heads, "head_dim": d // heads, "d_model": d}),
                Site(f"{pre}.attn.o", "linear", f"{attn}.c_proj", {"in": d, "out": d}),
                Site(f"{pre}.attn.out", "branch", attn, {"d": d}),
                Site(f"{pre}.ffn.ln", "norm", f"{lay}.ln_2", {"d": d}),
                Site(f"{pre}.ffn.wi", "linear", f"{lay}.mlp.c_fc", {"in": d, "out": d_ff}),
                Site(f"{pre}.ffn.wo", "linear", f"{lay}.mlp.c_proj", {"in": d_ff, "out": d}),
                Site(f"{pre}.ffn.out", "branch", f"{lay}.mlp", {"d": d}),
                Site(f"{pre}.out", "state", lay, {"d": d}),
            ]
        sites.append(Site("decoder.final_ln", "norm", f"{at}ln_f", {"d": d}))
        return sites

    def hook(self, site, control):
        if site.kind == "memory" and self.stack.config.reorder_and_upcast_attn:
            raise ValueError(
                "attention memory on GPT-2 needs reorder_and_upcast_attn=False: that option computes attention "
                "outside transformers' attention functions, where no memory rows can join the keys"
            )
        if site.kind == "linear" and "slice" in site.dims:
            if getattr(control, "acts_on", "output") == "input":
                raise ValueError(
                    f"{site.name} is a slice of the fused projection {site.dims['of']}: its input is shared by q, k "
                    f"and v, so a law on the input cannot act on {site.name} alone; use {site.dims['of']}"
                )
            return self.module(site).register_forward_hook(_slice_hook(control, *site.dims["slice"]))
        return super().hook(site, control)

    def weight_target(self, site, attribute: str, law):
        """(module, attribute, law') writing ``law`` (a law on an nn.Linear-layout weight (out, in) of the site, or
        its bias) into the module as GPT-2 stores it: Conv1D weights are (in, out), and q/k/v are column slices.

        For merging: θ ← law'(θ) on the stored parameter equals the site's law on its own weight.
        """
        module = self.module(site)
        if site.kind != "linear" or not isinstance(module, compat.Conv1D):
            return module, attribute, law
        lo, hi = site.dims.get("slice", (0, module.nf))

        def stored(theta):
            if attribute == "weight":
                new = law(theta[:, lo:hi].T)
                return None if new is None else torch.cat([theta[:, :lo], new.T.to(theta.dtype), theta[:, hi:]], 1)
            part = None if theta is None else theta[lo:hi]
            new = law(part)
            if new is None:
                return None
            if theta is None:
                return torch.cat([new.new_zeros(lo), new, new.new_zeros(module.nf - hi)])
            return torch.cat([theta[:lo], new.to(theta.dtype), theta[hi:]])

        return module, attribute, stored


def _slice_hook(control, lo: int, hi: int):
    """y' = [y_{:lo}, G(x, y_{lo:hi}), y_{hi:}] at one output slice of a fused layer."""

    def hook(module, args, output):
        x = args[0] if args else None
        part = control(x, output[..., lo:hi])
        return torch.cat([output[..., :lo], part, output[..., hi:]], dim=-1)

    return hook
