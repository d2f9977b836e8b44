"""Inference-time bias tuning for generation (UDDIA: Yang et al., 2022, "Unified detoxifying and debiasing in
language generation via inference-time adaptive optimization").

At each decoding step t the bias terms b of the top T decoder layers (a BitFit controller, deltactl method
"bitfit") take a few Adam steps on a differentiable attribute cost c of the step's trajectory,

    b_t = b_{t−1} − lr · Adam(∇_b c(h(y_<t; b)))        (b_0 the attached δ, usually 0),

and the next token is the argmax of the mixture p = λ p(· | y_<t; b_t) + (1 − λ) p(· | y_<t; b_0) of the tuned and
original next-token distributions (greedy decoding). Tuning degrades fluency, so UDDIA redoes the generation with
fewer tuned layers while the perplexity of the continuation under the original model exceeds a threshold:
T ← T − shrink, down to T = 0 (plain greedy decoding). The perplexity here is that of the whole batch's
continuation (exp of the mean token negative log-likelihood), so a redo concerns the batch.

With lr = 0 (or T = 0) the tokens are those of plain greedy decoding. δ is restored bit for bit afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from deltactl.control.attach import Delta
from deltactl.control.controller import PerSite, site_key
from deltactl.inference.loop import descend, preserved


def token_set_cost(token_ids, toward: bool = False):
    """Attribute cost on the next-token logits: log p(S) to push away from the set S, −log p(S) to pull toward it.

    log p(S) = logsumexp(logits_S) − logsumexp(logits), averaged over the batch; it reads the trajectory's output
    (a transformers output with ``logits``) at the last position.
    """
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the token set is empty")
    sign = -1.0 if toward else 1.0

    def cost(traj):
        logits = traj.output.logits[:, -1]
        log_mass = torch.logsumexp(logits[:, ids.to(logits.device)], -1) - torch.logsumexp(logits, -1)
        return sign * log_mass.mean()

    return cost


def head_cost(head: torch.nn.Module, target: int, stack: str = "decoder"):
    """Attribute cost −log softmax(head(h))[target] of a user's classifier head on the last state's last position."""

    def cost(traj):
        logits = head(traj[stack][-1][:, -1])
        return -F.log_softmax(logits, -1)[:, target].mean()

    return cost


def top_layer_biases(delta: Delta, n_layers: int, stack: str = "decoder") -> list[torch.Tensor]:
    """The BitFit biases of the top ``n_layers`` blocks of ``stack`` (including its final norm when it has one)."""
    controller = delta.controller
    if not isinstance(controller, PerSite) or controller.config.method != "bitfit":
        raise TypeError(f"bias tuning needs an attached bitfit delta, got {controller.config.method!r}")
    depth = len(delta.backbone.blocks()[stack])
    if not 0 <= n_layers <= depth:
        raise ValueError(f"the number of tuned layers must be in 0…{depth}, got {n_layers}")
    chosen = []
    for site in controller.sites:
        if site.stack != stack:
            continue
        top = site.layer is None or site.layer >= depth - n_layers  # the final norm counts as the top layer's
        if n_layers and top:
            chosen += list(controller.layers[site_key(site.name)].parameters())
    return chosen


@dataclass
class Generation:
    """Greedy sequences (decoder start token first), the tuned layers T of the accepted attempt, its perplexity,
    and every attempt's (T, perplexity)."""

    sequences: torch.Tensor
    layers: int
    perplexity: float
    attempts: list[tuple[int, float]] = field(default_factory=list)


def bias_tuned_generate(
    model, delta: Delta, cost, input_ids, attention_mask=None, *, max_new_tokens: int = 20, layers: int = 2,
    steps: int = 1, lr: float = 1e-2, mix: float = 0.5, max_perplexity: float = math.inf, shrink: int = 1,
    warm_start: bool = True,
) -> Generation:
    """Greedy decoding of an encoder–decoder with the top ``layers`` decoder biases tuned at every step.

    Args:
        model: a T5ForConditionalGeneration (any encoder–decoder whose ``generate`` is greedy with these settings).
        delta: an attached bitfit delta covering the decoder's top layers.
        cost: ``cost(trajectory) -> scalar`` (e.g. ``token_set_cost``, ``head_cost``); the trajectory is the
            backbone's rollout of the current step (``output.logits``, ``states["decoder"]``).
        layers: T at the first attempt; steps, lr: Adam steps per decoding step; mix: λ, the tuned share.
        max_perplexity: redo with T − shrink while the continuation's perplexity under the original model is above.
        warm_start: start each step's tuning from the previous step's biases (else from the original δ).

    Returns:
        Generation; the biases are back at their entry values.
    """
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if shrink < 1:
        raise ValueError(f"shrink must be ≥ 1, got {shrink}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attempts = []
    while True:
        sequences = _decode(model, delta, cost, input_ids, attention_mask, max_new_tokens, layers, steps, lr, mix,
                            warm_start)
        ppl = continuation_perplexity(model, input_ids, attention_mask, sequences)
        attempts.append((layers, ppl))
        if ppl <= max_perplexity or layers == 0:
            return Generation(sequences, layers, ppl, attempts)
        layers = max(0, layers - shrink)


def _decode(model, delta, cost, input_ids, attention_mask, max_new_tokens, layers, steps, lr, mix, warm_start):
    config = model.generation_config
    start, eos, pad = config.decoder_start_token_id, config.eos_token_id, config.pad_token_id
    eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    biases = top_layer_biases(delta, layers)
    batch = input_ids.shape[0]
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
    sequences = torch.full((batch, 1), start, dtype=torch.long, device=input_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    with preserved(biases):
        original = [b.detach().clone() for b in biases]

        def run(**kw):
            return delta.backbone.rollout(encoder_outputs=encoded, attention_mask=attention_mask,
                                          decoder_input_ids=sequences, **kw)

        for _ in range(max_new_tokens):
            with torch.no_grad():
                tuned_now = [b.detach().clone() for b in biases]
                _assign(biases, original)
                p_orig = F.softmax(run().output.logits[:, -1].double(), -1)
                _assign(biases, tuned_now if warm_start else original)
            if biases and steps:
                descend(lambda: cost(run()), biases, steps, lr)
                with torch.no_grad():
                    p_tuned = F.softmax(run().output.logits[:, -1].double(), -1)
                p = mix * p_tuned + (1.0 - mix) * p_orig
            else:
                p = p_orig
            token = p.argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            sequences = torch.cat([sequences, token[:, None]], dim=1)
            done |= torch.isin(token, eos_ids)
            if done.all():
                break
    return sequences


def _assign(params, values):
    for p, v in zip(params, values):
        p.copy_(v)


def continuation_perplexity(model, input_ids, attention_mask, sequences) -> float:
    """exp(mean NLL) of the generated tokens (up to and including each sequence's first eos) under the model."""
    config = model.generation_config
    eos = config.eos_token_id
    labels = sequences[:, 1:].clone()
    eos_ids = torch.as_tensor([eos] if isinstance(eos, int) else list(eos or []), device=labels.device)
    after_eos = torch.isin(labels, eos_ids).long().cumsum(1)
    finished_before = torch.cat([torch.zeros_like(after_eos[:, :1]), after_eos[:, :-1]], dim=1) > 0
    labels[finished_before] = -100
    if (labels != -100).sum() == 0:
        return 1.0
    with torch.no_grad():
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    return math.exp(loss.item())
