"""ReFT (LoReFT, NoReFT, DiReFT) against an independent float64 re-implementation of pyreft's interventions.

The reference runs the bare model with forward hooks of its own on the same blocks: positions are listed row by row
from the attention mask (a Python loop), and each intervention is pyreft's forward written out in its row-vector
layout (``rotate_layer.weight`` = Rᵀ is d×r, ``learned_source`` is W, b, ``proj_layer.weight`` is W₂).
"""

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5
from transformers import LlamaConfig, LlamaForCausalLM

import deltactl as dc
from deltactl.backbones import backbone_for
from deltactl.backbones.sites import Site
from deltactl.control.accounting import closed_form
from deltactl.methods import make_config, reft

METHODS = ["loreft", "noreft", "direft"]


def perturb(delta, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def chosen_positions(mask_row, first, last):
    """pyreft's f{first}+l{last} over the real tokens of one row: (first positions, last positions)."""
    real = [t for t, m in enumerate(mask_row.tolist()) if m]
    return real[:first], real[max(len(real) - last, 0):] if last else []


def pyreft_intervention(method, edit, base):
    """φ(base) for base of shape (n, d), as pyreft's Loreft/Noreft/Nodireft/Direft interventions compute it."""
    W, b = edit.source.weight, edit.source.bias
    learned = base @ W.T + b
    if method == "loreft" or (method == "direft" and edit.orthogonal):
        rotate = edit.rotation().T  # pyreft's rotate_layer.weight: d×r with orthonormal columns
        assert torch.allclose(rotate.T @ rotate, torch.eye(rotate.shape[1], dtype=rotate.dtype), atol=1e-12)
        if method == "direft":
            return base + learned @ rotate.T
        return base + (learned - base @ rotate) @ rotate.T
    proj = edit.R  # pyreft's proj_layer.weight, r×d
    if method == "noreft":
        return base + (learned - base @ proj.T) @ proj
    return base + learned @ proj


def reference_hooks(model, delta, method, masks):
    """Hooks on the bare model that apply the interventions by hand; ``masks``: stack -> its attention mask."""
    backbone = backbone_for(model)
    handles = []
    cfg = delta.config
    for site in delta.controller.sites:
        layer = delta.controller.layers[site.name.replace(".", "__")]

        def hook(module, args, output, layer=layer, mask=masks[site.stack]):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            for i in range(h.shape[0]):
                row = mask[i] if mask is not None else torch.ones(h.shape[1])
                first, last = chosen_positions(row, cfg.first, cfg.last)
                if len(layer.edits) == 1:
                    groups = [sorted(set(first) | set(last))]
                else:
                    groups = [first, last]
                for edit, positions in zip(layer.edits, groups):
                    if positions:
                        h[i, positions] = pyreft_intervention(method, edit, h[i, positions])
            return (h, *output[1:]) if isinstance(output, tuple) else h

        handles.append(backbone.module(site).register_forward_hook(hook))
    return handles


def padded_causal_batch(left=False):
    """Rows of 7, 5 and 3 real tokens, padded right (or left): the last k positions differ per row."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (3, 7), generator=g)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate((7, 5, 3)):
        if left:
            mask[i, 7 - n:] = 1
        else:
            mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def t5_batch():
    batch = tiny_batch(batch=3, src=7, tgt=5)
    batch["attention_mask"][1, 4:] = 0  # rows of 7, 4 and 5 real source tokens
    batch["attention_mask"][2] = torch.tensor([1, 1, 1, 1, 1, 0, 0])
    batch["decoder_attention_mask"] = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    return batch


CASES = {  # family: (model, batch, masks of the stacks, outputs compared)
    "t5": (tiny_t5, t5_batch, lambda b: {"encoder": b["attention_mask"], "decoder": b["decoder_attention_mask"]}),
    "bert": (tiny_bert, lambda: {**padded_causal_batch(), "token_type_ids": torch.zeros(3, 7, dtype=torch.long)},
             lambda b: {"encoder": b["attention_mask"]}),
    "gpt2_left_padded": (tiny_gpt2, lambda: padded_causal_batch(left=True), lambda b: {"decoder": b["attention_mask"]}),
    "llama": (tiny_llama, padded_causal_batch, lambda b: {"decoder": b["attention_mask"]}),
}

OPTIONS = [  # several position settings, each family's default sites; on T5 also the decoder
    {"r": 2, "first": 2, "last": 2},
    {"r": 3, "first": 1, "last": 3, "tied": False},
    {"r": 2, "first": 0, "last": 4, "layers": (1,)},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["f2+l2", "f1+l3-untied", "l4-layer1"])
@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_matches_the_pyreft_formulas(method, family, options):
    make, make_batch, masks = CASES[family]
    model, batch = make(), make_batch()
    if family == "t5":
        options = {**options, "sites": ("encoder.*.out", "decoder.*.out")}
    delta = dc.attach(model, method, **options)
    perturb(delta)
    with torch.no_grad():
        ours = model(**batch).logits
        with dc.disabled(model):
            bare = model(**batch).logits
            handles = reference_hooks(model, delta, method, masks(batch))
            try:
                expected = model(**batch).logits
            finally:
                for h in handles:
                    h.remove()
    assert torch.isfinite(bare).all()  # (a left-padded float64 Llama gives NaN rows under eager attention: not used)
    assert (ours - bare).abs().max() > 1e-3  # the interventions act (BERT's logits read [CLS] only)
    assert (ours - expected).abs().max().item() <= 1e-10
    delta.detach()


def test_direft_orthogonal_matches_pyreft_direft():
    model, batch = tiny_gpt2(), padded_causal_batch()
    delta = dc.attach(model, "direft", r=2, first=1, last=2, orthogonal=True)
    perturb(delta)
    with torch.no_grad():
        ours = model(**batch).logits
        with dc.disabled(model):
            handles = reference_hooks(model, delta, "direft", {"decoder": batch["attention_mask"]})
            expected = model(**batch).logits
            for h in handles:
                h.remove()
    assert (ours - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_other_positions_are_untouched_at_the_layer(method):
    model, batch = tiny_gpt2(), padded_causal_batch()
    delta = dc.attach(model, method, r=2, first=1, last=2, sites=("decoder.0.out",))
    perturb(delta)
    seen = []  # block 0's output after the law: block 1's input
    block = delta.backbone.blocks()["decoder"][1]
    handle = block.register_forward_pre_hook(lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True)
    with torch.no_grad():
        with dc.disabled(model):
            model(**batch)
        model(**batch)
    handle.remove()
    before, after = seen
    chosen = torch.zeros(3, 7, dtype=torch.bool)
    for i, (first, last) in enumerate([([0], [5, 6]), ([0], [3, 4]), ([0], [1, 2])]):
        chosen[i, first + last] = True
    assert torch.equal(after[~chosen], before[~chosen])  # bit for bit, padding included
    assert ((after - before).abs().amax(-1) > 1e-6)[chosen].all()
    delta.detach()


def test_orthonormal_rows_and_identity_start():
    delta = dc.attach(tiny_t5(), "loreft", r=3)
    perturb(delta, scale=1.0)
    R = delta.controller.layers["encoder__0__out"].edits[0].rotation()
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=R.dtype), atol=1e-13, rtol=0)
    X = torch.nn.init.orthogonal_(torch.empty(3, 16, dtype=torch.float64))
    torch.testing.assert_close(reft.orthonormal_rows(X), X, atol=1e-15, rtol=0)  # an orthonormal X is R itself
    for method in METHODS:
        edit = reft.Intervention(16, make_config(method, r=3).zero(), torch.float64)
        assert torch.equal(edit(torch.randn(2, 5, 16, dtype=torch.float64)), torch.zeros(2, 5, 16, dtype=torch.float64))


def test_a_cached_continuation_is_not_edited():
    """As pyreft generates: the prompt's pass is edited, the tokens decoded after it with a cache are not. The cached
    step equals a full pass over prompt and new token in which the reference edits the prompt's positions only."""
    model = tiny_llama()
    batch = {"input_ids": padded_causal_batch()["input_ids"], "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    delta = dc.attach(model, "loreft", r=2, first=1, last=2)
    perturb(delta)
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.ones(3, 8, dtype=torch.long)
        step = model(input_ids=nxt, attention_mask=mask, cache=out.past_key_values).logits[:, -1]
        layer = delta.controller.layers["decoder__0__out"]
        assert layer.tokens[1] == 7 and layer.positions(torch.zeros(3, 1, 16)) is None
        whole = {"input_ids": torch.cat([batch["input_ids"], nxt], 1), "attention_mask": mask}
        with dc.disabled(model):
            prompt_only = torch.cat([batch["attention_mask"], torch.zeros(3, 1, dtype=torch.long)], 1)
            handles = reference_hooks(model, delta, "loreft", {"decoder": prompt_only})
            expected = model(**whole).logits[:, -1]
            for h in handles:
                h.remove()
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert (step - expected).abs().max().item() <= 1e-10
    assert torch.equal(generated[:, 7], nxt[:, 0])
    delta.detach()


def test_sum_and_per_row_show_the_mask_to_the_law():
    model, batch = tiny_gpt2(), padded_causal_batch()
    one = dc.attach(model, "loreft", name="one", r=2, first=1, last=2)
    perturb(one)
    with torch.no_grad():
        expected = model(**batch).logits
        with dc.per_row(model, ["one", None, "one"]):
            mixed = model(**batch).logits
        one.disable()
        base = model(**batch).logits
        one.enable()
    torch.testing.assert_close(mixed[[0, 2]], expected[[0, 2]], atol=1e-12, rtol=0)
    torch.testing.assert_close(mixed[1], base[1], atol=1e-12, rtol=0)
    state = one.controller.state_dict()
    one.detach()
    parts = make_config("loreft", r=2, first=1, last=2), make_config("bitfit", sites=("*.q",))
    summed = dc.attach(model, dc.sum(*parts))
    summed.controller.parts[0].load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-12, rtol=0)  # BitFit's bias starts at 0
    summed.detach()


def test_options_are_checked():
    with pytest.raises(ValueError, match="not both 0"):
        dc.attach(tiny_t5(), "loreft", first=0, last=0)
    with pytest.raises(ValueError, match="layers \\[5\\]"):
        dc.attach(tiny_t5(), "noreft", layers=(5,))
    with pytest.raises(ValueError, match="orthonormal rows do not fit"):
        dc.attach(tiny_t5(), "loreft", r=17)


def test_default_sites_and_counts():
    t5 = dc.attach(tiny_t5(), "loreft")
    assert [s.name for s in t5.controller.sites] == ["encoder.0.out", "encoder.1.out"]
    assert t5.num_parameters() == 2 * (2 * 4 * 16 + 4) == closed_form(t5.config, t5.backbone)
    gpt2 = dc.attach(tiny_gpt2(), "direft", tied=False, first=2, last=2)
    assert [s.name for s in gpt2.controller.sites] == ["decoder.0.out", "decoder.1.out"]
    assert gpt2.num_parameters() == 2 * 2 * (2 * 4 * 16 + 4) == closed_form(gpt2.config, gpt2.backbone)
    bert = dc.attach(tiny_bert(), "noreft", layers=(1,), tied=False, first=0)  # one edit: no first positions
    assert bert.num_parameters() == 2 * 4 * 16 + 4


def test_llama_7b_counts_against_the_paper():
    """LoReFT on LLaMA-7B (d = 4096, 32 layers): 2rd + r per edited block; the ReFT paper reports 0.031% (r = 8,
    all layers, one set of parameters) and 0.0039% (r = 4, four layers, first and last positions untied)."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    base = sum(p.numel() for p in model.parameters())
    assert base == 6_738_415_616
    backbone = backbone_for(model)
    sites = [Site(f"decoder.{j}.out", "state", "", {"d": 4096}) for j in range(32)]
    assert reft.count(make_config("loreft", r=4), sites) == 32 * 32_772 == 1_048_704
    assert closed_form(make_config("loreft", r=4), backbone) == 1_048_704
    percent = {
        "r4_all": 100 * closed_form(make_config("loreft", r=4), backbone) / base,
        "r8_all": 100 * closed_form(make_config("loreft", r=8), backbone) / base,
        "r4_4layers_untied": 100 * closed_form(make_config("loreft", r=4, layers=(3, 9, 18, 24), tied=False), backbone)
        / base,
    }
    assert round(percent["r4_all"], 4) == 0.0156
    assert round(percent["r8_all"], 3) == 0.031
    assert round(percent["r4_4layers_untied"], 4) == 0.0039
