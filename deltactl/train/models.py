"""Models a task trains: an encoder classifier (mean pooling + linear head) or a text-to-text T5 that generates."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SequenceClassifier(nn.Module):
    """logits = W · mean_t h_t + b over the encoder's final states (the head trains with δ)."""

    def __init__(self, encoder: nn.Module, outputs: int):
        super().__init__()
        self.bert = encoder  # the attribute the BERT backbone looks for
        self.config = encoder.config
        self.head = nn.Linear(encoder.config.hidden_size, outputs)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        h = states.last_hidden_state[:, -input_ids.shape[1] :]  # rows a controller put in front are not pooled
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1).clamp(min=1))


@dataclass
class TaskModel:
    """A model with what the trainer needs to feed, score and evaluate it on a task."""

    model: nn.Module
    collate: Callable[[list], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    evaluate: Callable[[nn.Module, list, int], dict]
    head: list[str]  # names of task-head parameters that train with δ


def classifier(task, encoder, tokenizer, max_length: int) -> TaskModel:
    outputs = 1 if task.is_regression else len(task.labels)
    model = SequenceClassifier(encoder, outputs)

    def collate(examples):
        pairs = [e.text_b for e in examples]
        batch = tokenizer(
            [e.text_a for e in examples], pairs if any(p is not None for p in pairs) else None,
            truncation=True, max_length=max_length, padding=True, return_tensors="pt",
        )
        dtype = torch.float32 if task.is_regression else torch.long
        batch["labels"] = torch.tensor([task.label_index(e) for e in examples], dtype=dtype)
        return dict(batch)

    def loss(model, batch):
        labels = batch.pop("labels")
        logits = model(**batch)
        batch["labels"] = labels
        if task.is_regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels)
        return F.cross_entropy(logits.float(), labels)

    def evaluate(model, examples, batch_size):
        predictions, references = [], []
        device = next(model.parameters()).device
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            labels = batch.pop("labels")
            logits = model(**batch)
            predictions += logits.squeeze(-1).tolist() if task.is_regression else logits.argmax(-1).tolist()
            references += labels.tolist()
        return task.metric(predictions, references)

    return TaskModel(model, collate, loss, evaluate, head=[f"head.{n}" for n, _ in model.head.named_parameters()])


def text_to_text(task, model, tokenizer, max_length: int, max_new_tokens: int = 8) -> TaskModel:
    def collate(examples):
        batch = tokenizer(
            [task.source_text(e) for e in examples], truncation=True, max_length=max_length, padding=True,
            return_tensors="pt",
        )
        targets = tokenizer([task.target_text(e) for e in examples], padding=True, return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
        return {**batch, "labels": labels}

    def loss(model, batch):
        return model(**batch).loss

    def evaluate(model, examples, batch_size):
        predictions, references = [], []
        device = next(model.parameters()).device
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk)
            generated = model.generate(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False,
            )
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            predictions += [task.parse_target(t.strip()) for t in texts]
            references += [task.label_index(e) for e in chunk]
        return task.metric(predictions, references)

    return TaskModel(model, collate, loss, evaluate, head=[])
