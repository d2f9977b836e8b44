"""Closed-form parameter counts of each method on the T5-base shape (built on the meta device: no weights),
against formulas written out by hand."""

import pytest
import torch
from transformers import T5ForConditionalGeneration

import deltactl as dc
from deltactl.control.accounting import closed_form
from deltactl.methods import make_config
from deltactl.shapes import t5_config

D, FF, L = 768, 3072, 12  # T5-base: d_model, d_ff, layers per stack


@pytest.fixture(scope="module")
def backbone():
    with torch.device("meta"):
        return dc.backbone_for(T5ForConditionalGeneration(t5_config("t5-base")))


def sublayer_adapter(d, r):
    return 2 * d * r + d + r  # down (d·r + r) and up (r·d + d)


FORMULAS = {
    # 12 encoder + 12 decoder blocks, two adapters each (after attention, after FFN): 2·(2dr + d + r) per layer
    ("adapter", ()): 2 * L * 2 * sublayer_adapter(D, 64),
    ("pfeiffer", ()): 2 * L * sublayer_adapter(D, 64),
    ("parallel_adapter", ()): 2 * L * sublayer_adapter(D, 64),
    ("lowrank_adapter", ()): 2 * L * 2 * (2 * 1 * (D + 64) + D + 64),
    ("compacter", ()): 2 * 4**3 + 2 * L * 2 * (2 * 1 * (D + 64) + D + 64),
    # q and v of encoder self-, decoder self- and cross-attention: r·(d_in + d_out) each
    ("lora", ()): 3 * L * 2 * 8 * (D + D),
    # k and v scaled at their outputs (36 sites × 768), the FFN activations at wo's input (24 × 3072)
    ("ia3", ()): 3 * L * 2 * D + 2 * L * FF,
    ("ln_tuning", ()): (L * 2 + 1 + L * 3 + 1) * D,  # RMS norms: gains only
    ("bitfit", ()): 3 * L * (3 * D + D) + 2 * L * (FF + D) + (L * 2 + 1 + L * 3 + 1) * D,
    ("prompt", ()): 100 * D,
    ("prefix", (("reparameterize", False),)): 20 * 2 * D * 3 * L,  # encoder self, decoder self and cross
    # reparameterised: a p × d embedding E, then W₂ tanh(W₁ E + b₁) + b₂ with W₁ d → 512 (d·512 + 512) and
    # W₂ 512 → all 36 memories' key/value rows (512·w + w, w = 2·d·3L)
    ("prefix", ()): 20 * D + (D * 512 + 512) + (512 * (2 * D * 3 * L) + 2 * D * 3 * L),
    ("last_layer", ()): 4 * D * D + 2 * D * FF + 2 * D,
    ("named", (("sites", ("encoder.0.attn.q.weight",)),)): D * D,
}


@pytest.mark.parametrize(("method", "options"), list(FORMULAS))
def test_closed_form_counts_match_the_formulas(backbone, method, options):
    assert closed_form(make_config(method, **dict(options)), backbone) == FORMULAS[method, options]


def test_diff_pruning_and_masks_count_their_weights(backbone):
    total = sum(p.numel() for p in backbone.model.parameters())
    assert closed_form(make_config("diff_pruning"), backbone) == 2 * total  # w and log α per weight
    linear = 3 * L * 4 * D * D + 2 * L * 2 * D * FF
    assert closed_form(make_config("mask"), backbone) == linear
