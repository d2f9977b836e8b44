"""Prompt-tuning (Lester et al., 2021): p trainable rows placed before the input embeddings."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register


@dataclass(frozen=True)
class PromptConfig(DeltaConfig):
    """Args: length p soft tokens; init "vocab" (copies of sampled vocabulary embeddings, seeded) or "random"."""

    method: ClassVar[str] = "prompt"
    small: ClassVar[dict] = {"length": 2}
    sites: tuple[str, ...] = ("*.embed",)  # the input sequence: encoder.embed, or decoder.embed (decoder-only)
    length: int = 100
    init: str = "vocab"
    init_vocab_size: int = 5000  # sample from the most frequent tokens (low ids in sentencepiece vocabularies)
    seed: int = 0

    def zero(self):
        return replace(self, length=0)  # no rows: the input is the pre-trained model's


class SoftPrompt(nn.Module):
    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = nn.Parameter(rows)

    def forward(self, embeds):
        return self.rows.unsqueeze(0).expand(embeds.shape[0], -1, -1)


def initial_rows(cfg: PromptConfig, embedding: nn.Embedding) -> torch.Tensor:
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.init == "vocab":
        vocab = min(cfg.init_vocab_size, embedding.num_embeddings)
        ids = torch.randint(vocab, (cfg.length,), generator=generator)
        return embedding.weight.detach()[ids.to(embedding.weight.device)].clone().cpu()
    if cfg.init == "random":
        return torch.empty(cfg.length, embedding.embedding_dim).uniform_(-0.5, 0.5, generator=generator)
    raise ValueError(f"unknown prompt init {cfg.init!r}; use 'vocab' or 'random'")


def build(cfg, backbone, sites):
    if cfg.length < 0:
        raise ValueError(f"prompt length must be ≥ 0, got {cfg.length}")
    embedding = backbone.input_embeddings()
    return PerSite(cfg, sites, {s.name: SoftPrompt(initial_rows(cfg, embedding)) for s in sites})


def count(cfg, sites):
    return sum(cfg.length * s.dims["d"] for s in sites)


register(PromptConfig, {"sequence"}, build, count)
