"""Mistral and Qwen2 through the Llama backbone: the same sites, the conformance contracts for the methods users tune
them with, and a clear refusal of prefix rows under a sliding attention window. (PEFT cross-checks for both are in
tests/test_decoder_only_peft.py.)"""

from dataclasses import dataclass

import pytest
import test_conformance as conformance
import torch
from conftest import Case, tiny_causal_batch, tiny_llama, tiny_mistral, tiny_qwen2

import deltactl as dc

MAKERS = {"mistral": tiny_mistral, "qwen2": tiny_qwen2}
METHODS = ["lora", "ia3", "bitfit", "adapter", "prefix", "prompt", "dora", "loreft"]


@dataclass(frozen=True)
class LlamaLike(Case):
    @property
    def decoder_only(self) -> bool:
        return True

    def model(self, seed=0, **overrides):
        return MAKERS[self.family](seed, **{**self.variant, **overrides})


@pytest.mark.parametrize("family", MAKERS)
def test_sites_are_llamas(family):
    ours = dc.backbone_for(MAKERS[family]())
    assert type(ours).__name__ == {"mistral": "MistralBackbone", "qwen2": "Qwen2Backbone"}[family]
    llama = dc.backbone_for(tiny_llama())
    kinds = [name for name, site in ours.sites.items() if site.kind != "parameter"]
    assert kinds == [name for name, site in llama.sites.items() if site.kind != "parameter"]
    extra = {n for n in ours.sites if n not in llama.sites}  # parameter sites: Qwen2's q, k, v biases
    assert extra == ({f"decoder.{j}.attn.{x}.bias" for j in (0, 1) for x in "qkv"} if family == "qwen2" else set())


@pytest.mark.parametrize("family", MAKERS)
@pytest.mark.parametrize("method", METHODS)
def test_contracts(family, method, tmp_path, request):
    case = LlamaLike(family, {})
    conformance.test_zero_control_is_the_pretrained_model(case, method)
    conformance.test_detach_is_bit_exact(case, method)
    conformance.test_only_delta_trains_with_the_closed_form_count(case, method)
    conformance.test_save_load_round_trip(case, method, tmp_path)
    conformance.test_merge_equals_unmerged_and_unmerge_is_exact(case, method, torch.float64, request)


def test_qwen2_bitfit_tunes_the_biases_qwen2_has():
    model = tiny_qwen2()
    delta = dc.attach(model, "bitfit", sites=("*.attn.q",))
    with torch.no_grad():
        for p in delta.parameters():
            p.fill_(0.5)
        before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("q_proj.bias")}
        batch = tiny_causal_batch()
        unmerged = model(**batch).logits
        delta.merge()
        assert all(torch.equal(p, before[n] + 0.5) for n, p in model.named_parameters() if n in before)  # added
        torch.testing.assert_close(model(**batch).logits, unmerged, atol=1e-10, rtol=0)


def test_prefix_under_a_sliding_window_is_refused_and_the_model_left_as_it_was():
    model = tiny_mistral(sliding_window=4)
    with pytest.raises(ValueError, match=r"attention memory \(prefix rows\) on a mistral model with a sliding window "
                                         r"of 4 tokens is not supported"):
        dc.attach(model, "prefix", length=2)
    assert dc.deltas(model) == {} and all(p.requires_grad for p in model.parameters())
    dc.attach(model, "lora", r=2)  # methods that add no attention rows work under the window
