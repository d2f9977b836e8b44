"""Named model shapes (random init): the real architectures' sizes (T5, GPT-2, Llama), for tests, counts and
benchmarks. ``model_for(shape)`` builds one."""

from __future__ import annotations

from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

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
# GPT-2: n_embd, layers, heads, vocab, positions
_GPT2 = {"gpt2-tiny": (16, 2, 2, 64, 32), "gpt2": (768, 12, 12, 50257, 1024),
         "gpt2-medium": (1024, 24, 16, 50257, 1024)}
# Llama: hidden, layers, heads, key/value heads, intermediate, vocab (grouped-query attention where kv < heads)
_LLAMA = {"llama-tiny": (16, 2, 4, 2, 24, 64), "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000)}
SHAPES = tuple(_SHAPES) + tuple(_GPT2) + tuple(_LLAMA)


def model_for(shape: str):
    """A random-init model of a named shape, with eager attention (T5 seq2seq, GPT-2 and Llama causal LMs)."""
    if shape in _GPT2:
        d, layers, heads, vocab, positions = _GPT2[shape]
        ids = {"bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0} if vocab < 1000 else {}  # inside a tiny vocab
        return GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab,
                                          n_positions=positions, attn_implementation="eager", **ids))
    if shape in _LLAMA:
        d, layers, heads, kv, ff, vocab = _LLAMA[shape]
        return LlamaForCausalLM(LlamaConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                            num_key_value_heads=kv, intermediate_size=ff, vocab_size=vocab,
                                            attn_implementation="eager"))
    return T5ForConditionalGeneration(t5_config(shape))


def t5_config(shape: str, vocab_size: int | None = None, **overrides) -> T5Config:
    """T5Config of a named shape with eager attention and T5's real special-token ids."""
    if shape not in _SHAPES:
        raise ValueError(f"unknown T5 shape {shape!r}; known T5 shapes: {', '.join(_SHAPES)}")
    d_model, d_kv, heads, d_ff, layers, ffn, tied = _SHAPES[shape]
    vocab = vocab_size or (64 if shape == "t5-tiny" else 32128)
    fields = dict(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff, num_layers=layers,
        num_decoder_layers=layers, feed_forward_proj=ffn, tie_word_embeddings=tied,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )
    fields.update(overrides)
    return T5Config(**fields)
