"""Named T5 shapes (random init): the real architectures' sizes, for tests, counts and benchmarks."""

from __future__ import annotations

from transformers import T5Config

# d_model, d_kv, heads, d_ff, layers, feed_forward_proj, tied embeddings
_SHAPES = {
    "t5-tiny": (16, 4, 2, 32, 2, "relu", True),
    "t5-small": (512, 64, 8, 2048, 6, "relu", True),
    "t5-base": (768, 64, 12, 3072, 12, "relu", True),
    "t5-large": (1024, 64, 16, 4096, 24, "relu", True),
    "t5-3b": (1024, 128, 32, 16384, 24, "relu", True),
    "t5-v1_1-small": (512, 64, 6, 1024, 8, "gated-gelu", False),
    "t5-v1_1-base": (768, 64, 12, 2048, 12, "gated-gelu", False),
    "t5-v1_1-large": (1024, 64, 16, 2816, 24, "gated-gelu", False),
}
SHAPES = tuple(_SHAPES)


def t5_config(shape: str, vocab_size: int | None = None, **overrides) -> T5Config:
    """T5Config of a named shape with eager attention and T5's real special-token ids."""
    if shape not in _SHAPES:
        raise ValueError(f"unknown T5 shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    d_model, d_kv, heads, d_ff, layers, ffn, tied = _SHAPES[shape]
    vocab = vocab_size or (64 if shape == "t5-tiny" else 32128)
    fields = dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff, num_layers=layers,
        num_decoder_layers=layers, feed_forward_proj=ffn, tie_word_embeddings=tied,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )
    fields.update(overrides)
    return T5Config(**fields)
