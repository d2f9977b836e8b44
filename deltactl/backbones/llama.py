"""The Llama family (``LlamaForCausalLM``, ``LlamaModel``) mapped onto canonical sites.

Llama is pre-norm with RMS norms, rotary positions and grouped-query attention (the keys and values have
``num_key_value_heads`` ≤ ``num_attention_heads`` heads, each read by a group of query heads); its MLP is gated,
F(x) = W_down(σ(W_gate x) ⊙ W_up x). Per layer ``j`` of the one stack ``decoder``:

- ``decoder.j.attn.{q,k,v,o}`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``; k and v are heads_kv·head_dim
  wide), ``decoder.j.ffn.{wi_0,wi_1,wo}`` (``gate_proj``, ``up_proj``, ``down_proj``, named as T5 v1.1's gated
  FFN: wi_0 is the gate): linear
- ``decoder.j.attn.kv``: attention memory, one key/value row set per key/value head (``heads`` = heads_kv), shared
  by that head's group of query heads as the model's own keys are; the rows carry no rotary position
- ``decoder.j.{attn,ffn}.ln`` (``input_layernorm``, ``post_attention_layernorm``), ``decoder.final_ln``
  (``norm``): RMS norms
- ``decoder.j.{attn,ffn}.out``: the sub-layer's update F(x), before the residual add
- ``decoder.j.out``: the residual stream leaving block j
- ``decoder.embed``: the input sequence (rows before the tokens; see ``decoder_only.py``)
"""

from __future__ import annotations

from transformers import LlamaModel, MistralModel, Qwen2Model

from deltactl.backbones.decoder_only import DecoderOnlyBackbone
from deltactl.backbones.sites import Site


class LlamaBackbone(DecoderOnlyBackbone):
    family = "llama"
    stack_class = LlamaModel

    def blocks(self):
        return {"decoder": list(self.stack.layers[: self.stack.config.num_hidden_layers])}

    def _build_sites(self):
        cfg = self.stack.config
        d, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or d // heads
        at = self.at
        sites = [Site("decoder.embed", "sequence", self.path, {"d": d})]
        for j in range(len(self.blocks()["decoder"])):
            lay, pre = f"{at}layers.{j}", f"decoder.{j}"
            attn = f"{lay}.self_attn"
            sites += [
                Site(f"{pre}.attn.ln", "norm", f"{lay}.input_layernorm", {"d": d}),
                Site(f"{pre}.attn.q", "linear", f"{attn}.q_proj", {"in": d, "out": heads * head_dim}),
                Site(f"{pre}.attn.k", "linear", f"{attn}.k_proj", {"in": d, "out": kv_heads * head_dim}),
                Site(f"{pre}.attn.v", "linear", f"{attn}.v_proj", {"in": d, "out": kv_heads * head_dim}),
                Site(f"{pre}.attn.kv", "memory", attn, {"heads": kv_heads, "head_dim": head_dim, "d_model": d}),
                Site(f"{pre}.attn.o", "linear", f"{attn}.o_proj", {"in": heads * head_dim, "out": d}),
                Site(f"{pre}.attn.out", "branch", attn, {"d": d}),
                Site(f"{pre}.ffn.ln", "norm", f"{lay}.post_attention_layernorm", {"d": d}),
                Site(f"{pre}.ffn.wi_0", "linear", f"{lay}.mlp.gate_proj", {"in": d, "out": cfg.intermediate_size}),
                Site(f"{pre}.ffn.wi_1", "linear", f"{lay}.mlp.up_proj", {"in": d, "out": cfg.intermediate_size}),
                Site(f"{pre}.ffn.wo", "linear", f"{lay}.mlp.down_proj", {"in": cfg.intermediate_size, "out": d}),
                Site(f"{pre}.ffn.out", "branch", f"{lay}.mlp", {"d": d}),
                Site(f"{pre}.out", "state", lay, {"d": d}),
            ]
        sites.append(Site("decoder.final_ln", "norm", f"{at}norm", {"d": d}))
        return sites


class _Windowed(LlamaBackbone):
    """Llama's layer with an optional sliding attention window. Attention memory (prefix rows) is refused while a
    window is on: a cached prefix leaves the window as decoding moves on, rows held outside the cache do not, and
    which of the two a user means is not ours to guess."""

    def windowed(self) -> bool:
        cfg = self.stack.config
        if hasattr(cfg, "use_sliding_window") and not cfg.use_sliding_window:
            return False
        return bool(getattr(cfg, "sliding_window", None))

    def hook(self, site, control):
        if site.kind == "memory" and self.windowed():
            raise ValueError(
                f"{site.name}: attention memory (prefix rows) on a {self.family} model with a sliding window of "
                f"{self.stack.config.sliding_window} tokens is not supported; load the model with sliding_window=None "
                "(the default of recent Mistral releases) or tune it with a method that does not add attention rows"
            )
        return super().hook(site, control)


class MistralBackbone(_Windowed):
    """Mistral: Llama's layer (module names included) with an optional sliding attention window."""

    family = "mistral"
    stack_class = MistralModel


class Qwen2Backbone(_Windowed):
    """Qwen2: Llama's layer with biases on q, k and v (BitFit finds them), and an optional sliding window."""

    family = "qwen2"
    stack_class = Qwen2Model
