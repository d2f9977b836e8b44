"""Probes for known bugs of the installed PEFT on the installed transformers, for strict ``xfail`` markers.

Each probe runs PEFT alone (no deltactl) on a tiny random float32 model built here, independent of conftest, and
answers in well under a second; results are cached per process. A probe returns True only when it observes the
bug itself (not merely a version number), so a fixed PEFT or transformers turns it False and the strict xfail it
guards becomes a failure that says so. Where a probe cannot observe the bug's symptom it returns False, so the
guarded test runs and shows whatever is actually wrong.

Observed with PEFT 0.21.2: both bugs on transformers 5.24.0, neither on 5.23.0.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import peft
import torch
import transformers
from peft import PrefixTuningConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, T5Config, T5ForConditionalGeneration

VERSIONS = f"PEFT {peft.__version__} on transformers {transformers.__version__}"


def _quiet_and_seeded(fn):
    """Run ``fn`` with warnings silenced and the global RNG restored afterwards (PEFT initialises with it)."""

    @functools.wraps(fn)
    def wrapper():
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            return fn()

    return wrapper


@functools.cache
@_quiet_and_seeded
def peft_t5_prefix_generate_drops_prefix() -> bool:
    """Whether PEFT's ``generate()`` with prefix-tuning on T5 ignores the prefix (it then equals the base model).

    Detects: PEFT's greedy ``generate()`` scores are bit-identical to the base model's although PEFT's own
    ``forward()`` with the same prefix differs from the base model's. Cause on transformers 5.24: PEFT's
    ``PeftModelForSeq2SeqLM.prepare_inputs_for_generation`` puts the prefix cache under ``past_key_values``, while
    ``generate()`` now hands the model its own, empty cache as ``cache`` (the renamed argument); the model's
    ``@deprecate_kwarg("past_key_values", new_name="cache")`` keeps ``cache`` and drops ``past_key_values`` with
    only a FutureWarning. (PEFT's prefill test also looks the cache up as ``past_key_values``, so it takes every
    decoding step for the prefill: renaming the key alone would restart the cache at each step.) ``forward()`` is
    unaffected, as the decorator renames a lone ``past_key_values`` to ``cache``.

    Returns False where PEFT's generate uses the prefix (transformers 5.23), where its forward shows no effect of the
    prefix either (nothing to tell apart), or where generate raises (a different failure, left to the test).
    """
    cfg = T5Config(
        vocab_size=16, d_model=8, d_kv=4, num_heads=2, d_ff=8, num_layers=1, num_decoder_layers=1,
        relative_attention_num_buckets=4, relative_attention_max_distance=8, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager",
    )
    model = T5ForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    start = torch.zeros(1, 1, dtype=torch.long)

    def greedy(m):
        with torch.no_grad():
            out = m.generate(input_ids=ids, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        return torch.stack(out.scores)

    with torch.no_grad():
        base_logits = model(input_ids=ids, decoder_input_ids=start).logits
    base_scores = greedy(model)
    peft_model = get_peft_model(model, PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2, prefix_projection=False, token_dim=8, num_layers=1,
    ))
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.normal_(0.0, 3.0)
        prefixed_logits = peft_model(input_ids=ids, decoder_input_ids=start).logits
    if (prefixed_logits - base_logits).abs().max() < 1e-3:
        return False  # the prefix changes nothing even in forward: this probe cannot tell
    try:
        scores = greedy(peft_model)
    except Exception:
        return False
    return torch.equal(scores, base_scores)


@functools.cache
@_quiet_and_seeded
def peft_bert_prefix_raises() -> bool:
    """Whether PEFT's prefix-tuning forward on BertForSequenceClassification raises before running the model.

    Detects: ``ValueError("Model does not support past key values which are required for prefix tuning.")`` from
    ``PeftModelForSequenceClassification._prefix_tuning_forward``, raised when neither the model's ``forward`` nor
    its backbone's (``BertModel.forward``) has a parameter named ``past_key_values``. Cause on transformers 5.24:
    the parameter was renamed ``cache`` (the old name is still accepted as a keyword, but PEFT inspects the
    signature). Any other outcome (it runs, or raises something else) returns False and is left to the test.
    """
    cfg = BertConfig(
        vocab_size=16, hidden_size=8, num_attention_heads=2, intermediate_size=8, num_hidden_layers=1,
        max_position_embeddings=16, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=2, pad_token_id=0, attn_implementation="eager",
    )
    peft_model = get_peft_model(BertForSequenceClassification(cfg).eval(), PrefixTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=2, prefix_projection=False,
    ))
    try:
        with torch.no_grad():
            peft_model(input_ids=torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    except ValueError as error:
        return "does not support past key values" in str(error)
    return False


def cache_argument(forward) -> str:
    """The name under which ``forward`` takes its key/value cache: ``cache`` (transformers ≥ 5.24) or
    ``past_key_values`` (earlier)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


T5_GENERATE_DROPS_PREFIX = (
    f"upstream: {VERSIONS}: PeftModelForSeq2SeqLM.generate() silently drops the prefix (its output is the base "
    "model's). PEFT passes the prefix cache as `past_key_values`; transformers' generate() passes its own empty "
    "cache as `cache` (renamed in 5.24), and the model keeps `cache` and discards `past_key_values`. "
    "Probe: peft_probes.peft_t5_prefix_generate_drops_prefix"
)
BERT_PREFIX_RAISES = (
    f"upstream: {VERSIONS}: PEFT's prefix-tuning on BertForSequenceClassification raises 'Model does not support "
    "past key values' because it looks for a `past_key_values` parameter in BertModel.forward, which transformers "
    "5.24 renamed `cache`. Probe: peft_probes.peft_bert_prefix_raises"
)

