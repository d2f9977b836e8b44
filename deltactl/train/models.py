"""Models a task trains: an encoder classifier (mean pooling + a linear or a label-word head), a text-to-text T5,
or a decoder-only LM (GPT-2, Llama) answering after the source.

Heads of an encoder, over the mean-pooled final states h̄ = mean_t h_t:

- ``linear``: logits = W h̄ + b, trained with δ (the usual fine-tuning head; it maps to one task's label indices);
- ``label_words``: logits_c = τ · cos(h̄, e_c), with e_c the encoder's own mean-pooled embedding of class c's
  verbaliser word (e.g. "negative", "positive"), computed once with the pre-trained weights and frozen. Nothing
  outside δ trains, so a δ carries the whole task: it transfers to any classification task by swapping the words,
  d = 0 in a subspace is the zero-shot model, and for a sentence-embedding model such as all-MiniLM-L6-v2 the
  head is a zero-shot classifier (τ = 20 as in sentence-transformers' contrastive losses). Tuning δ moves the
  sentence embeddings toward the right label word, the role a verbaliser plays in prompt tuning (Lester et al.
  2021; Qin et al. 2021).

A text-to-text T5 predicts a class by rank classification (default): the class whose verbalised target has the
highest log-likelihood Σ_t log p(y_t | y_<t, x) under teacher forcing, so every prediction is a valid label even
for a model that does not yet generate one; ``generate`` decodes greedily and parses the text (regression tasks
always generate). A decoder-only LM does the same on ``source answer``: the loss covers the answer's tokens, and
rank classification scores each class's answer after the source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEADS = ("linear", "label_words")
PREDICTIONS = ("rank", "generate")


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1).clamp(min=1)


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
        # The head trains with δ and, like δ, keeps its own dtype (float32) on a half-precision encoder.
        return self.head(mean_pool(h.to(self.head.weight.dtype), attention_mask))


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
        h = h.to(torch.promote_types(h.dtype, torch.float32))  # cosines in float32 at least
        return self.scale * F.normalize(mean_pool(h, attention_mask), dim=-1) @ self.labels.to(h.dtype).T


@dataclass
class TaskModel:
    """A model with what the trainer needs to feed, score and evaluate it on a task."""

    model: nn.Module
    collate: Callable[[list], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]
    evaluate: Callable[[nn.Module, list, int], dict]
    head: list[str]  # names of task-head parameters that train with δ


def classifier(task, encoder, tokenizer, max_length: int, head: str = "linear") -> TaskModel:
    """An encoder with a ``linear`` head (trained with δ) or a frozen ``label_words`` head (see the module)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; heads: {', '.join(HEADS)}")
    if head == "label_words":
        if task.is_regression:
            raise ValueError(f"{task.name} is a regression task: it has no label words; use the linear head")
        words = [task.verbalizer[label].replace("_", " ") for label in task.labels]
        model = LabelWordClassifier(encoder, tokenizer, words)
    else:
        model = SequenceClassifier(encoder, 1 if task.is_regression else len(task.labels))

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

    trained_head = [f"head.{n}" for n, _ in model.head.named_parameters()] if head == "linear" else []
    return TaskModel(model, collate, loss, evaluate, head=trained_head)


def class_log_likelihoods(model, input_ids, attention_mask, class_targets: torch.Tensor) -> torch.Tensor:
    """(batch, classes) Σ_t log p(y_t | y_<t, x) of each class's target token row (-100 pads a row's end).

    One teacher-forced forward per class through the whole model, so a controller that changes the inputs
    (a prompt's rows, a prefix's memory) acts exactly as it does in training.
    """
    scores = []
    for target in class_targets:
        labels = target.expand(input_ids.shape[0], -1).contiguous()
        logits = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).logits
        picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((picked * (labels != -100)).sum(-1))
    return torch.stack(scores, dim=-1)


def text_to_text(task, model, tokenizer, max_length: int, max_new_tokens: int = 8, predict: str = "rank") -> TaskModel:
    """A seq2seq model trained on (source text, verbalised label); predictions by ``rank`` or ``generate``."""
    if predict not in PREDICTIONS:
        raise ValueError(f"unknown prediction mode {predict!r}; modes: {', '.join(PREDICTIONS)}")
    rank = predict == "rank" and not task.is_regression
    if rank:  # every class's target tokens, padded with -100 to one length
        words = tokenizer(task.class_targets(), padding=True, return_tensors="pt")
        class_targets = words["input_ids"].masked_fill(words["attention_mask"] == 0, -100)

    def collate(examples):
        batch = tokenizer(
            [task.source_text(e) for e in examples], truncation=True, max_length=max_length, padding=True,
            return_tensors="pt",
        )
        targets = tokenizer([task.target_text(e) for e in examples], padding=True, return_tensors="pt")
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
        return {**batch, "labels": labels}

    def predict_chunk(model, chunk, device):
        batch = collate(chunk)
        if rank:
            scores = class_log_likelihoods(model, batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device), class_targets.to(device))
            return scores.argmax(-1).tolist()
        generated = model.generate(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False,
        )
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [task.parse_target(t.strip()) for t in texts]

    return TaskModel(model, collate, lm_loss, _chunked_evaluation(task, predict_chunk), head=[])


def causal_lm(task, model, tokenizer, max_length: int, max_new_tokens: int = 8, predict: str = "rank") -> TaskModel:
    """A decoder-only LM (GPT-2, Llama) trained on ``source target``: the loss covers the target's tokens only, and a
    class is predicted by rank (the class whose verbalised target is likeliest after the source) or ``generate``.

    Rows are right-padded; a controller that puts rows before the tokens (a prompt) lengthens the logits, so scores
    are read from the last positions, which are always the tokens'.
    """
    if predict not in PREDICTIONS:
        raise ValueError(f"unknown prediction mode {predict!r}; modes: {', '.join(PREDICTIONS)}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rank = predict == "rank" and not task.is_regression
    targets = [_ids(tokenizer, t) for t in task.class_targets()] if rank else None

    def sequences(examples, answers):
        """input ids, attention mask and labels (−100 on the source and the padding) for source + answer rows."""
        rows, labels = [], []
        for example, answer in zip(examples, answers):
            source = _ids(tokenizer, task.source_text(example), special=True)[: max(1, max_length - len(answer))]
            rows.append(source + answer)
            labels.append([-100] * len(source) + answer)
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])}

    def collate(examples):
        return sequences(examples, [_ids(tokenizer, task.target_text(e)) for e in examples])

    def predict_chunk(model, chunk, device):
        if rank:
            batches = ({k: v.to(device) for k, v in sequences(chunk, [t] * len(chunk)).items()} for t in targets)
            scores = [answer_log_likelihood(model, batch) for batch in batches]
            return torch.stack(scores, -1).argmax(-1).tolist()
        predictions = []
        for example in chunk:  # one row at a time: no padding between the source and the answer
            ids = torch.tensor([_ids(tokenizer, task.source_text(example), special=True)], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            predictions.append(task.parse_target(text.strip()))
        return predictions

    return TaskModel(model, collate, lm_loss, _chunked_evaluation(task, predict_chunk), head=[])


def lm_loss(model, batch):
    """The language model's own loss on a batch with labels (−100 where nothing is predicted)."""
    return model(**batch).loss


def _chunked_evaluation(task, predict_chunk):
    """``evaluate(model, examples, batch_size)``: the task metric of ``predict_chunk(model, chunk, device)`` over
    consecutive chunks of the examples."""

    def evaluate(model, examples, batch_size):
        predictions, references = [], []
        device = next(model.parameters()).device
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            references += [task.label_index(e) for e in chunk]
            predictions += predict_chunk(model, chunk, device)
        return task.metric(predictions, references)

    return evaluate


def answer_log_likelihood(model, batch) -> torch.Tensor:
    """(batch,) Σ log p(token_t | tokens_<t) over the positions whose label is not −100 (the answer's tokens)."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -labels.shape[1]:]  # rows a prompt put in front predict nothing here
    picked = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels[:, 1:] != -100)).sum(-1)


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    """Token ids of ``text``; with ``special`` the tokenizer's own start/end tokens, without them for an answer (a
    space in front, so it tokenises as a continuation)."""
    return tokenizer(text if special else " " + text, add_special_tokens=special)["input_ids"]
