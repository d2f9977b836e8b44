"""Text attacks to evaluate robust inference against: character typos, word drop/swap, universal triggers.

- ``typos``: in a share of the words (≥ 3 letters), one character edit: swap two inner neighbours, delete, insert
  or substitute a letter (the character-level perturbations of Pruthi et al., 2019; TextBugger's "bug" edits).
- ``drop_words`` / ``swap_words``: delete a share of the words, or swap a share of adjacent word pairs.
- ``universal_trigger``: a few tokens prepended to every input of a class that push the model away from it,
  found by the gradient search of Wallace et al. (2019, "Universal adversarial triggers"), HotFlip style
  (Ebrahimi et al., 2018): with e_i the embedding of trigger token i and g_i the gradient of the loss on the target
  label, the first-order change of the loss for replacing it by vocabulary row w is (w − e_i)·g_i; the candidates
  with the lowest scores are evaluated exactly on the batch and the best is kept, token by token.

All are seeded and deterministic; they change text, so any model can be scored on the result.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

import torch
import torch.nn.functional as F

LETTERS = string.ascii_lowercase


def typos(text: str, rate: float, rng: random.Random) -> str:
    """Apply one random character edit to each word of ≥ 3 letters with probability ``rate``."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if len(word) >= 3 and word.isalpha() and rng.random() < rate:
            words[i] = _edit(word, rng)
    return " ".join(words)


def _edit(word: str, rng: random.Random) -> str:
    kind = rng.choice(("swap", "delete", "insert", "substitute"))
    # inner neighbours that differ (the first and last letters stay), so a swap always changes the word
    swappable = [j for j in range(1, len(word) - 2) if word[j] != word[j + 1]]
    if kind == "swap" and swappable:
        j = rng.choice(swappable)
        return word[:j] + word[j + 1] + word[j] + word[j + 2:]
    if kind == "swap":
        kind = "substitute"
    j = rng.randrange(1, len(word) - 1)
    if kind == "delete":
        return word[:j] + word[j + 1:]
    if kind == "insert":
        return word[:j] + rng.choice(LETTERS) + word[j:]
    return word[:j] + rng.choice([c for c in LETTERS if c != word[j]]) + word[j + 1:]


def drop_words(text: str, rate: float, rng: random.Random) -> str:
    """Delete each word with probability ``rate`` (at least one word is kept)."""
    words = text.split()
    kept = [w for w in words if rng.random() >= rate]
    return " ".join(kept or words[:1])


def swap_words(text: str, rate: float, rng: random.Random) -> str:
    """Walk left to right; with probability ``rate`` swap a word with its right neighbour (then skip both)."""
    words = text.split()
    i = 0
    while i < len(words) - 1:
        if rng.random() < rate:
            words[i], words[i + 1] = words[i + 1], words[i]
            i += 2
        else:
            i += 1
    return " ".join(words)


PERTURBATIONS: dict[str, Callable[[str, float, random.Random], str]] = {
    "typo": typos, "drop": drop_words, "swap": swap_words,
}


def perturb(texts: list[str], kind: str, rate: float, seed: int) -> list[str]:
    """The texts under one perturbation kind ("typo", "drop", "swap"), seeded per text position."""
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose one of {', '.join(PERTURBATIONS)}")
    if not 0 <= rate <= 1:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    return [PERTURBATIONS[kind](t, rate, random.Random(seed * 1_000_003 + i)) for i, t in enumerate(texts)]


def word_vocabulary(tokenizer) -> torch.Tensor:
    """Ids of whole-word alphabetic tokens (no special tokens, no ## pieces): triggers that survive re-tokenising."""
    special = set(tokenizer.all_special_ids)
    ids = [i for tok, i in tokenizer.get_vocab().items()
           if i not in special and tok.isalpha() and tok.isascii() and len(tok) > 1]
    return torch.tensor(sorted(ids))


def insert_trigger(inputs: dict, trigger: torch.Tensor) -> dict:
    """The batch with the trigger ids placed right after the first token ([CLS]), masks and token types widened."""
    ids = inputs["input_ids"]
    batch = ids.shape[0]
    trig = trigger.to(ids.device).expand(batch, -1)
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids[:, :1], trig, ids[:, 1:]], dim=1)
    if "attention_mask" in inputs:
        m = inputs["attention_mask"]
        out["attention_mask"] = torch.cat([m[:, :1], torch.ones_like(trig), m[:, 1:]], dim=1)
    if inputs.get("token_type_ids") is not None:
        t = inputs["token_type_ids"]
        out["token_type_ids"] = torch.cat([t[:, :1], torch.zeros_like(trig), t[:, 1:]], dim=1)
    return out


def universal_trigger(
    classify: Callable[..., torch.Tensor], embeddings: torch.nn.Embedding, batches: list[tuple[dict, torch.Tensor]],
    target: int, *, length: int = 3, vocabulary: torch.Tensor, init_id: int, iterations: int = 3,
    candidates: int = 10,
) -> torch.Tensor:
    """HotFlip search for ``length`` trigger ids making ``classify`` predict ``target`` on ``batches``.

    Args:
        classify: the model; ``classify(**inputs)`` gives logits. Its parameters are not changed.
        embeddings: the token embedding table the model looks inputs up in (its output is hooked for gradients).
        batches: (inputs, labels) of the examples to attack (labels unused: the loss is CE on ``target``).
        vocabulary: ids a trigger token may take; init_id: the starting token (e.g. "the").
        iterations: passes over the trigger positions; candidates: exact evaluations per position.

    Returns:
        The trigger ids (length,).
    """
    trigger = torch.full((length,), init_id, dtype=torch.long, device=vocabulary.device)
    table = embeddings.weight.detach()
    vocab_rows = table[vocabulary.to(table.device)]

    def loss_of(trig, with_grad=False):
        total, grads, count = 0.0, torch.zeros(length, table.shape[1], dtype=table.dtype, device=table.device), 0
        captured = {}

        def hook(module, args, output):  # the looked-up embeddings become a leaf whose gradient we read
            captured["e"] = output.detach().requires_grad_(with_grad)
            return captured["e"]

        for inputs, _ in batches:
            handle = embeddings.register_forward_hook(hook)
            try:
                with torch.set_grad_enabled(with_grad):
                    logits = classify(**insert_trigger(inputs, trig))
                    goal = torch.full((logits.shape[0],), target, dtype=torch.long, device=logits.device)
                    loss = F.cross_entropy(logits.float(), goal, reduction="sum")
                    if with_grad:
                        (g,) = torch.autograd.grad(loss, captured["e"])
                        grads += g[:, 1:1 + length].sum(0)
            finally:
                handle.remove()
            total += loss.item()
            count += logits.shape[0]
        return total / count, grads

    best, _ = loss_of(trigger)
    for _ in range(iterations):
        for i in range(length):
            _, grads = loss_of(trigger, with_grad=True)
            scores = (vocab_rows - table[trigger[i]]) @ grads[i]  # first-order change of the loss
            for cand in vocabulary[scores.argsort()[:candidates].to(vocabulary.device)]:
                trial = trigger.clone()
                trial[i] = cand
                value, _ = loss_of(trial)
                if value < best:
                    best, trigger = value, trial
    return trigger
