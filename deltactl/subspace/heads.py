"""A frozen label-word head for a sentence encoder, so that subspace runs train nothing outside the subspace.

logits_c = τ · cos(mean_t h_t, e_c), with e_c the encoder's own mean-pooled embedding of the class's verbaliser
word(s) (e.g. "negative", "positive"), computed once with the pre-trained weights and frozen. For a
sentence-embedding model such as all-MiniLM-L6-v2 this is a zero-shot classifier (τ = 20 as in
sentence-transformers' contrastive losses); tuning δ, z or a prompt moves the sentence embeddings toward the
right label word, the role a verbaliser plays in prompt tuning (Lester et al., 2021; Qin et al., 2021).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.train.models import TaskModel, classifier


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


class LabelWordClassifier(nn.Module):
    """logits = τ · cos(pool(encoder(x)), e_c) with frozen label-word embeddings e_c (a buffer, not a parameter)."""

    def __init__(self, encoder: nn.Module, tokenizer, label_words: list[str], scale: float = 20.0):
        super().__init__()
        if not label_words:
            raise ValueError("a label-word head needs at least one label word (a regression task has none)")
        self.bert = encoder  # the attribute the BERT backbone looks for
        self.config = encoder.config
        self.scale = scale
        words = tokenizer(label_words, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = encoder(**words).last_hidden_state
        self.register_buffer("labels", F.normalize(mean_pool(h, words["attention_mask"]), dim=-1))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        h = h.last_hidden_state[:, -input_ids.shape[1]:]  # rows a prompt put in front are not pooled
        return self.scale * F.normalize(mean_pool(h, attention_mask), dim=-1) @ self.labels.T


def label_word_task_model(task, encoder, tokenizer, max_length: int = 64, scale: float = 20.0) -> TaskModel:
    """The TaskModel of ``deltactl.train.models.classifier`` (collate, loss, evaluate) with a label-word head."""
    words = [task.verbalizer[label].replace("_", " ") for label in task.labels]
    base = classifier(task, encoder, tokenizer, max_length)
    return TaskModel(LabelWordClassifier(encoder, tokenizer, words, scale), base.collate, base.loss, base.evaluate,
                     head=[])
