"""Export deltactl deltas to PEFT's saved format and import PEFT adapters: the other side is real PEFT, and the
outputs agree on identical weights (tiny T5 and BERT, float64)."""

import copy
import json

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    set_peft_model_state_dict,
)
from safetensors.torch import load_file

import deltactl as dc
from deltactl.control.controller import site_key

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def randomise(delta, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def t5_out(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def bert_out(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


FAMILIES = {
    "t5": (lambda: tiny_t5(), tiny_batch(), t5_out),
    # PEFT's prompt learning for feature extraction drops token_type_ids ("not supported"): batches without them
    "bert": (lambda: tiny_bert(head=False), {k: v for k, v in tiny_bert_batch().items() if k != "token_type_ids"},
             bert_out),
}
EXPORTS = {
    "lora": {"r": 2, "alpha": 4.0},
    "ia3": {},
    "prompt": {"length": 3},
    "prefix": {"length": 3, "reparameterize": True, "mid_dim": 5},
}


def deltactl_batch(family, method, batch):
    """PEFT passes a BERT prefix as a key/value cache, which moves the tokens to positions p…p+T−1; deltactl's
    memory rows carry no position (tests/test_bert_backbone.py). Like is compared with like by giving deltactl
    the positions PEFT uses."""
    if family == "bert" and method == "prefix":
        length = batch["input_ids"].shape[1]
        return {**batch, "position_ids": torch.arange(3, 3 + length).expand(batch["input_ids"].shape[0], -1)}
    return batch


def peft_sites(family):
    return ("decoder.*.attn.kv",) if family == "t5" else ("encoder.*.attn.kv",)


@pytest.mark.parametrize("method", list(EXPORTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, family, method):
    make, batch, out = FAMILIES[family]
    model = make()
    reference = copy.deepcopy(model)
    base = out(reference, batch)
    options = dict(EXPORTS[method])
    if method == "prefix":
        options["sites"] = peft_sites(family)
        # PEFT's T5 layout makes both decoder layers of the tiny model read one set of rows: tie ours likewise
        # (BERT keeps the MLP-reparameterised prefix, exported as its rows)
        options["reparameterize"] = family == "bert"
    delta = dc.attach(model, method, **options)
    randomise(delta)
    if method == "prefix" and family == "t5":
        with torch.no_grad():
            rows = list(delta.controller.rows.values())
            rows[1].copy_(rows[0])
    ours = out(model, deltactl_batch(family, method, batch))
    assert (ours[:, -base.shape[1] :] - base).abs().max() > 1e-3  # (BERT's states include prompt rows)
    dc.export_peft(delta, tmp_path)
    peft_model = PeftModel.from_pretrained(reference, tmp_path)
    # PEFT builds prompt encoders in float32, which rounds our float64 rows while loading: widen, then load again
    peft_model.to(torch.float64)
    set_peft_model_state_dict(peft_model, load_file(str(tmp_path / "adapter_model.safetensors")))
    torch.testing.assert_close(out(peft_model, batch), ours, atol=TOL, rtol=0)


PEFT_CONFIGS = {
    "lora": lambda family: LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"] if family == "t5" else
                                      ["query", "value"], init_lora_weights=False),
    "ia3": lambda family: IA3Config(
        target_modules=["k", "v", "wo"] if family == "t5" else ["key", "value", "output.dense"],
        feedforward_modules=["wo"] if family == "t5" else ["output.dense"], init_ia3_weights=False,
    ),
    "prompt": lambda family: PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM" if family == "t5" else "FEATURE_EXTRACTION", num_virtual_tokens=3),
    "prefix": lambda family: PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM" if family == "t5" else "FEATURE_EXTRACTION", num_virtual_tokens=3,
        token_dim=8 if family == "t5" else 16, num_layers=2),
}


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_of_a_peft_adapter_gives_its_outputs(tmp_path, family, method):
    make, batch, out = FAMILIES[family]
    model = make()
    peft_model = get_peft_model(copy.deepcopy(model), PEFT_CONFIGS[method](family))
    peft_model.to(torch.float64)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:  # give PEFT's adapter non-trivial values
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype) * 0.3)
    expected = out(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    delta = dc.import_peft(model, tmp_path)
    assert delta.config.method == method
    torch.testing.assert_close(out(model, deltactl_batch(family, method, batch)), expected, atol=TOL, rtol=0)


def test_what_peft_cannot_hold_is_refused(tmp_path):
    with pytest.raises(ValueError, match="PEFT export covers lora, ia3, prompt, prefix; this delta is 'adapter'"):
        dc.export_peft(dc.attach(tiny_t5(), "adapter", r=2), tmp_path)
    with pytest.raises(ValueError, match="PEFT's prefix-tuning acts at decoder.*attn.kv only"):
        dc.export_peft(dc.attach(tiny_t5(), "prefix", length=2), tmp_path)
    delta = dc.attach(tiny_t5(), "prefix", length=2, reparameterize=False, sites=("decoder.*.attn.kv",))
    with pytest.raises(ValueError, match="read the same prefix rows as an earlier layer"):
        dc.export_peft(delta, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        dc.import_peft(tiny_t5(), tmp_path / "missing")


# ---- prefix-tuning on T5 with encoder and decoder of different depths ---------------------------------------------

STACKS = {"encoder_deeper": (6, 3), "decoder_deeper": (3, 6)}


def t5_with_stacks(stacks):
    encoder, decoder = STACKS[stacks]
    return tiny_t5(num_layers=encoder, num_decoder_layers=decoder)


def t5_loss(model, batch):
    with torch.no_grad():
        return model(**batch, labels=batch["decoder_input_ids"]).loss


def decoder_rows(delta):
    """Decoder layer → its p × 2·width prefix rows."""
    return {s.layer: delta.controller.rows[site_key(s.name)] for s in delta.controller.sites}


@pytest.mark.parametrize("stacks", list(STACKS))
def test_prefix_export_on_unequal_stacks_loads_in_peft_with_the_same_outputs(tmp_path, stacks):
    model, batch = t5_with_stacks(stacks), tiny_batch()
    reference = copy.deepcopy(model)
    base = t5_out(reference, batch)
    delta = dc.attach(model, "prefix", length=3, reparameterize=False, sites=("decoder.*.attn.kv",))
    randomise(delta)
    rows, depth = decoder_rows(delta), STACKS[stacks][1]
    if depth % 2 == 0:  # exported with num_layers = 6, PEFT's layout makes layers l and l + 3 read one set of rows
        with torch.no_grad():
            for layer in range(depth // 2, depth):
                rows[layer].copy_(rows[layer - depth // 2])
    ours = t5_out(model, batch)
    assert (ours - base).abs().max() > 1e-3
    dc.export_peft(delta, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["num_layers"] == depth
    peft_model = PeftModel.from_pretrained(reference, tmp_path)
    peft_model.to(torch.float64)
    set_peft_model_state_dict(peft_model, load_file(str(tmp_path / "adapter_model.safetensors")))
    torch.testing.assert_close(t5_out(peft_model, batch), ours, atol=TOL, rtol=0)
    torch.testing.assert_close(t5_loss(peft_model, batch), t5_loss(model, batch), atol=TOL, rtol=0)


# (stacks, the adapter's num_layers): None is PEFT's own choice, the model's num_hidden_layers, i.e. the encoder's
# depth; with the decoder deeper PEFT's choice fails in PEFT's own forward, so num_layers is given. 4 on a 3-layer
# decoder ties layers 0 and 2; 7 on a 6-layer one leaves slots unread and ties none.
PEFT_PREFIXES = [("encoder_deeper", None), ("encoder_deeper", 4), ("decoder_deeper", 6), ("decoder_deeper", 7)]


@pytest.mark.parametrize(("stacks", "num_layers"), PEFT_PREFIXES)
def test_import_of_a_peft_trained_prefix_on_unequal_stacks_gives_its_outputs(tmp_path, stacks, num_layers):
    model, batch = t5_with_stacks(stacks), tiny_batch()
    base = t5_out(model, batch)
    config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, token_dim=8, num_layers=num_layers)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    assert peft_model.peft_config["default"].num_layers == (num_layers or STACKS[stacks][0])
    peft_model.to(torch.float64)
    optimiser = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):  # a few steps of PEFT's own training, then rows of different sizes in every slot
        optimiser.zero_grad()
        peft_model(**batch, labels=batch["decoder_input_ids"]).loss.backward()
        optimiser.step()
    with torch.no_grad():
        embedding = peft_model.prompt_encoder["default"].embedding.weight
        embedding.add_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(2), dtype=embedding.dtype))
    peft_model.eval()
    expected = t5_out(peft_model, batch)
    assert (expected - base).abs().max() > 1e-3
    peft_model.save_pretrained(tmp_path)
    delta = dc.import_peft(model, tmp_path)
    assert [s.name for s in delta.controller.sites] == [f"decoder.{i}.attn.kv" for i in range(STACKS[stacks][1])]
    torch.testing.assert_close(t5_out(model, batch), expected, atol=TOL, rtol=0)
    torch.testing.assert_close(t5_loss(model, batch), t5_loss(peft_model, batch), atol=TOL, rtol=0)


def test_import_of_a_peft_prefix_with_more_layers_than_bert(tmp_path):
    model, batch = tiny_bert(head=False), {k: v for k, v in tiny_bert_batch().items() if k != "token_type_ids"}
    config = PrefixTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3, token_dim=16, num_layers=3)
    peft_model = get_peft_model(copy.deepcopy(model), config).to(torch.float64)
    expected = bert_out(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    dc.import_peft(model, tmp_path)
    torch.testing.assert_close(bert_out(model, deltactl_batch("bert", "prefix", batch)), expected, atol=TOL, rtol=0)


def save_peft_prefix(folder, model, **options):
    options = {"task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3, **options}
    get_peft_model(copy.deepcopy(model), PrefixTuningConfig(**options)).save_pretrained(folder)
    return folder


def test_a_peft_prefix_that_does_not_fit_the_model_is_refused(tmp_path):
    deep_decoder, batch = t5_with_stacks("decoder_deeper"), tiny_batch()
    base = t5_out(deep_decoder, batch)
    folder = save_peft_prefix(tmp_path / "short", deep_decoder, token_dim=8)  # PEFT's num_layers: the encoder's 3
    with pytest.raises(ValueError, match="num_layers=3, but the model's decoder has 6 self-attention layers"):
        dc.import_peft(deep_decoder, folder)
    folder = save_peft_prefix(tmp_path / "wide", deep_decoder, num_layers=6)  # PEFT's token_dim: d_model = 16
    with pytest.raises(ValueError, match=r"token_dim=16 over num_attention_heads=2, .* has 8 = 2 heads × 4"):
        dc.import_peft(deep_decoder, folder)
    folder = save_peft_prefix(tmp_path / "edited", deep_decoder, num_layers=6, token_dim=8)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 7}))
    with pytest.raises(ValueError, match=r"prompt_embeddings is \(3, 96\), but .* num_layers=7 .* make it \(3, 112\)"):
        dc.import_peft(deep_decoder, folder)
    assert torch.equal(t5_out(deep_decoder, batch), base)  # nothing was attached
