"""The models and batches the theory statements are checked on (random init, eager attention, deterministic).

- ``tiny_t5()``: t5-tiny's architecture (d_model 16, 2 heads of 4, 2 + 2 blocks, relative position buckets) in
  float64, for checks that need exact arithmetic and every Jacobian column.
- ``small_t5()``: the t5-small architecture (d_model 512, 8 heads, 6 + 6 blocks, vocabulary 32,128), random init,
  float32, for structural checks on a real shape.
- ``tiny_bert()``: a 2-layer BERT classifier in float64.

The tiny models take ``attention="sdpa"`` too: reverse-mode checks (costates, MSA) run under both kernels, since a
replay that is only wrong under one of them (a reused cache, say) must not go unseen.
"""

from __future__ import annotations

import functools

import torch
from transformers import BertConfig, BertForSequenceClassification, T5ForConditionalGeneration

from deltactl.methods import REGISTRY, make_example
from deltactl.shapes import t5_config


# Small settings of the built-in methods so that the tiny models stay tiny; any other method uses its defaults.
def small_config(method: str, **extra):
    """The method's small example (``DeltaConfig.small``), so the tiny models stay tiny."""
    return make_example(method, **extra)


def default_config(method: str):
    """The method's defaults, as a user would attach it (plus the options it has no default for)."""
    return make_example(method, small=False)


def registered_methods() -> list[str]:
    return sorted(REGISTRY)


def tiny_t5(seed: int = 0, attention: str = "eager") -> T5ForConditionalGeneration:
    """``attention``: the attention implementation ("eager", or "sdpa" for checks that need no forward-mode AD)."""
    torch.manual_seed(seed)
    config = t5_config("t5-tiny", d_ff=24, dropout_rate=0.0, relative_attention_num_buckets=8,
                       relative_attention_max_distance=16, attn_implementation=attention)
    return T5ForConditionalGeneration(config).to(torch.float64).eval()


@functools.lru_cache(maxsize=1)
def _small_t5_state(seed: int):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(t5_config("t5-small", dropout_rate=0.0)).eval().state_dict()


def small_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A fresh t5-small-shaped model (weights built once per process, then copied)."""
    with torch.device("meta"):
        model = T5ForConditionalGeneration(t5_config("t5-small", dropout_rate=0.0))
    model.load_state_dict(_small_t5_state(seed), assign=True)
    model.tie_weights()
    return model.eval()


def tiny_bert(seed: int = 0, attention: str = "eager") -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_attention_heads=2, intermediate_size=24, num_hidden_layers=2,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        attn_implementation=attention,
    )
    return BertForSequenceClassification(config).to(torch.float64).eval()


def t5_batch(vocab: int = 64, batch: int = 2, src: int = 6, tgt: int = 4, seed: int = 1, pad: bool = True) -> dict:
    """Source ids with one padded row (masks matter), decoder inputs and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    if pad:
        mask[-1, src - 2:] = 0
    labels = torch.randint(2, vocab, (batch, tgt), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bert_batch(seed: int = 1, batch: int = 2, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 64, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2][:batch])}


def perturb(params, seed: int = 0, scale: float = 0.3) -> None:
    """Random values for δ, so that the control is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
