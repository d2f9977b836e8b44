"""Tiny deterministic T5 fixtures (random init, eager attention, float64)."""

import pytest
import torch
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

VOCAB = 64


def tiny_config(**overrides) -> T5Config:
    fields = dict(
        vocab_size=VOCAB, d_model=16, d_kv=4, num_heads=2, d_ff=24, num_layers=2, num_decoder_layers=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )
    fields.update(overrides)
    return T5Config(**fields)


def tiny_t5(seed=0, dtype=torch.float64, encoder_only=False, **overrides):
    torch.manual_seed(seed)
    cls = T5EncoderModel if encoder_only else T5ForConditionalGeneration
    return cls(tiny_config(**overrides)).to(dtype).eval()


def tiny_batch(seed=1, batch=2, src=6, tgt=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, src), generator=g)
    mask = torch.ones(batch, src, dtype=torch.long)
    mask[-1, src - 2 :] = 0  # one padded row, so masks matter
    dec = torch.randint(2, VOCAB, (batch, tgt), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}


# T5 variants the suite runs on: v1.0 (ReLU), v1.1 (gated GELU, untied head) and heads·d_kv ≠ d_model.
VARIANTS = {
    "v1_0": {},
    "v1_1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    "wide_heads": {"d_kv": 6, "num_heads": 3, "num_decoder_layers": 3},
}


@pytest.fixture(params=list(VARIANTS))
def t5(request):
    return tiny_t5(**VARIANTS[request.param])


@pytest.fixture
def batch():
    return tiny_batch()
