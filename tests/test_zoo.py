"""Each method of the zoo against a hand-derived float64 reference of its formula, on T5 and BERT sub-layers."""

import math

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from transformers.activations import ACT2FN

import deltactl as dc
from deltactl.control.controller import site_key
from deltactl.methods.compacter import phm_weight


def randomise(delta, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return delta


def layer(delta, site):
    return delta.controller.layers[site_key(site)]


def t5_ffn(model, j=0):
    return model.encoder.block[j].layer[-1]  # T5LayerFF: h + DenseReluDense(LN(h))


def ffn_reference(ffn, h, update):
    """h + update(x, F) with x = LN(h) the FFN's input and F = W_o relu(W_i x) its output (T5 v1.0), by hand
    (the norm is T5's own module: no delta acts there, and it keeps T5's float32 variance)."""
    with torch.no_grad():
        x = ffn.layer_norm(h)
        dense = ffn.DenseReluDense
        return h + update(x, torch.relu(x @ dense.wi.weight.T) @ dense.wo.weight.T)


def bottleneck(net, z, act="relu"):
    return net.up(ACT2FN[act](net.down(z)))


H = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["adapter", "pfeiffer"])
def test_sequential_adapters_on_the_ffn(method):
    model = tiny_t5()
    delta = randomise(dc.attach(model, method, r=5, sites=("encoder.0.ffn.out",)))
    net = layer(delta, "encoder.0.ffn.out")
    expected = ffn_reference(t5_ffn(model), H, lambda x, f: f + bottleneck(net, f))
    with torch.no_grad():
        torch.testing.assert_close(t5_ffn(model)(H), expected, atol=1e-12, rtol=0)


def test_parallel_adapter_reads_the_sublayer_input():
    model = tiny_t5()
    delta = randomise(dc.attach(model, "parallel_adapter", r=5, scale=4.0, sites=("encoder.0.ffn.out",)))
    net = layer(delta, "encoder.0.ffn.out")
    expected = ffn_reference(t5_ffn(model), H, lambda x, f: f + 4.0 * bottleneck(net, x))
    with torch.no_grad():
        torch.testing.assert_close(t5_ffn(model)(H), expected, atol=1e-12, rtol=0)


def test_lowrank_adapter_factorises_each_projection():
    model = tiny_t5()
    delta = randomise(dc.attach(model, "lowrank_adapter", r=6, rank=2, sites=("encoder.0.ffn.out",)))
    net = layer(delta, "encoder.0.ffn.out")
    down = net.down.A @ net.down.B.T  # r × d, rank ≤ 2
    up = net.up.A @ net.up.B.T
    assert torch.linalg.matrix_rank(down) == 2 and down.shape == (6, 16) and up.shape == (16, 6)
    expected = ffn_reference(
        t5_ffn(model), H, lambda x, f: f + (torch.relu(f @ down.T + net.down.bias) @ up.T + net.up.bias)
    )
    with torch.no_grad():
        torch.testing.assert_close(t5_ffn(model)(H), expected, atol=1e-12, rtol=0)


def test_phm_weight_is_a_sum_of_kronecker_products():
    n, p, q, k = 3, 4, 5, 2
    g = torch.Generator().manual_seed(0)
    rule, s, t = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((n, n, n), (n, p, k), (n, q, k)))
    expected = sum(torch.kron(rule[i], s[i] @ t[i].T) for i in range(n))
    torch.testing.assert_close(phm_weight(rule, s, t), expected, atol=1e-14, rtol=0)


def test_compacter_shares_its_rule_and_matches_the_formula():
    model = tiny_t5()
    delta = randomise(dc.attach(model, "compacter", r=4, n=2, rank=1, activation="relu"))
    ctrl = delta.controller
    names = [n for n, _ in delta.named_parameters()]
    assert names.count("rule_down") == 1 and names.count("rule_up") == 1  # one rule for every adapter
    net = ctrl.layers[site_key("encoder.0.ffn.out")]

    def update(x, f):
        down = phm_weight(ctrl.rule_down, net.down.s, net.down.t)
        up = phm_weight(ctrl.rule_up, net.up.s, net.up.t)
        return f + torch.relu(f @ down.T + net.down.bias) @ up.T + net.up.bias

    with torch.no_grad():
        torch.testing.assert_close(t5_ffn(model)(H), ffn_reference(t5_ffn(model), H, update), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="n=3 must divide the width d=16"):
        dc.attach(tiny_t5(), "compacter", r=6, n=3)


def test_ia3_scales_keys_values_and_ffn_activations():
    model = tiny_t5()
    delta = randomise(dc.attach(model, "ia3"), scale=1.0)
    attn = model.encoder.block[0].layer[0].SelfAttention
    l_k = layer(delta, "encoder.0.attn.k").l
    with torch.no_grad():
        torch.testing.assert_close(attn.k(H), (H @ attn.k.weight.T) * l_k, atol=1e-12, rtol=0)
        dense = t5_ffn(model).DenseReluDense
        l_ff = layer(delta, "encoder.0.ffn.wo").l
        expected = (torch.relu(H @ dense.wi.weight.T) * l_ff) @ dense.wo.weight.T
        torch.testing.assert_close(dense(H), expected, atol=1e-12, rtol=0)
    assert layer(delta, "encoder.0.ffn.wo").l.shape == (24,)  # d_ff: the input of wo


SPECIFICATION = {
    "ln_tuning": {},
    "last_layer": {},
    "selective": {"budget": 0.3, "seed": 1},
    "named": {"sites": ("encoder.1.attn.q.weight", "shared.weight")},
    "mask": {},
    "diff_pruning": {"sites": ("encoder.0.*", "decoder.1.cross.k.weight")},
}


BERT_OPTIONS = {
    "named": {"sites": ("encoder.1.attn.q.bias", "embeddings.word_embeddings.weight")},
    "diff_pruning": {"sites": ("encoder.0.*", "encoder.embed_ln.bias")},
}


def written_copy(reference, delta):
    """``reference`` (a fresh copy of the base model) with θ' = G(θ) written in, from the delta's weight laws."""
    with torch.no_grad():
        for site, attribute, law in delta.controller.weight_laws():
            param = reference.get_submodule(site.module)._parameters[attribute]
            param.copy_(law(param))
    return reference


@pytest.mark.parametrize("method", list(SPECIFICATION))
@pytest.mark.parametrize("family", ["t5", "bert"])
def test_specification_methods_equal_the_model_with_changed_weights(method, family):
    make, batch = (tiny_t5, tiny_batch()) if family == "t5" else (tiny_bert, tiny_bert_batch())
    model = make()
    options = SPECIFICATION[method]
    if family == "bert":
        options = BERT_OPTIONS.get(method, options)
    delta = randomise(dc.attach(model, method, **options), scale=0.1)
    if method == "mask":  # scores around the threshold, so that some entries are masked
        with torch.no_grad():
            for p in delta.parameters():
                p.add_(delta.config.threshold)
    reference = written_copy(make(), delta)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_ln_tuning_covers_every_norm_gain_and_bias():
    t5, bert = dc.attach(tiny_t5(), "ln_tuning"), dc.attach(tiny_bert(), "ln_tuning")
    assert {s.name for s in t5.controller.sites} == {
        n for n in t5.backbone.sites if n.endswith("ln.weight")
    }  # RMS norms: gains only
    assert "encoder.embed_ln.bias" in {s.name for s in bert.controller.sites}
    assert t5.num_parameters() == 16 * (2 * 2 + 3 * 2 + 2)


def test_last_layer_tunes_the_top_block():
    model = tiny_t5()
    delta = dc.attach(model, "last_layer")
    assert {s.name for s in delta.controller.sites} == {
        "encoder.1.attn.q.weight", "encoder.1.attn.k.weight", "encoder.1.attn.v.weight", "encoder.1.attn.o.weight",
        "encoder.1.attn.ln.weight", "encoder.1.ffn.wi.weight", "encoder.1.ffn.wo.weight", "encoder.1.ffn.ln.weight",
    }
    decoder = dc.attach(tiny_t5(), "last_layer", stack="decoder", layers=2)
    assert {s.layer for s in decoder.controller.sites} == {0, 1}
    with pytest.raises(ValueError, match="layers must be between 1 and 2"):
        dc.attach(tiny_t5(), "last_layer", layers=3)
    with pytest.raises(ValueError, match="no 'decoder' stack"):
        dc.attach(tiny_bert(), "last_layer", stack="decoder")


def test_selective_choice_is_seeded_and_within_budget():
    model = tiny_t5()
    total = sum(p.numel() for p in model.parameters())
    picks = {}
    for seed in (0, 0, 1):
        delta = dc.attach(model, "selective", budget=0.2, seed=seed)
        picks.setdefault(seed, []).append(tuple(s.name for s in delta.controller.sites))
        assert 0 < delta.num_parameters() <= 0.2 * total
        delta.detach()
    assert picks[0][0] == picks[0][1] and picks[0][0] != picks[1][0]
    groups = {name.split(".")[3] for name in picks[0][0]}
    assert groups <= {"wi", "wo", "q", "k", "v", "ln"}
    with pytest.raises(ValueError, match="unknown module group 'mlp'"):
        dc.attach(model, "selective", groups=("mlp",))
    with pytest.raises(ValueError, match="fits no module"):
        dc.attach(model, "selective", budget=1e-6)


def test_diff_pruning_gates_penalty_and_sparsity():
    model = tiny_t5()
    delta = dc.attach(model, "diff_pruning", sites=("encoder.0.attn.q.weight",), l0=1.0)
    gated = layer(delta, "encoder.0.attn.q.weight")
    assert delta.controller.sparsity() == {"nonzero": 0, "total": 128, "share": 0.0}  # w = 0: Δ = 0
    with torch.no_grad():
        gated.w.normal_()
        gated.log_alpha[:2] = -20.0  # closed gates (two rows of the 8 × 16 weight): exact zeros
    eval_gate = gated.gate(sample=False)
    assert torch.all(eval_gate[:2] == 0) and torch.all(eval_gate[2:] == 1)  # σ(3)·1.2 − 0.1 > 1: clipped
    assert delta.controller.sparsity()["nonzero"] == 128 - 2 * 16
    expected = torch.sigmoid(gated.log_alpha - 2 / 3 * math.log(0.1 / 1.1)).mean()
    torch.testing.assert_close(delta.controller.penalty(), expected)
    gated.train()
    assert not torch.equal(gated.gate(), gated.gate())  # training samples the gates

    # minimising the penalty alone closes gates: realised sparsity grows
    optimizer = torch.optim.Adam([gated.log_alpha], lr=0.5)
    for _ in range(30):
        optimizer.zero_grad()
        delta.controller.penalty().backward()
        optimizer.step()
    assert delta.controller.sparsity()["share"] < 0.5


def test_mask_straight_through_gradient():
    model, batch = tiny_t5(), tiny_batch()
    labels = batch["decoder_input_ids"]
    delta = dc.attach(model, "mask", sites=("encoder.0.attn.q.weight",))
    mask_layer = layer(delta, "encoder.0.attn.q.weight")
    with torch.no_grad():
        mask_layer.scores[:3] = 0.0  # below the threshold: rows 0-2 masked
    model(**batch, labels=labels).loss.backward()

    reference = tiny_t5()
    weight = reference.encoder.block[0].layer[0].SelfAttention.q.weight
    with torch.no_grad():
        weight[:3] = 0
    weight.requires_grad_(True)
    reference(**batch, labels=labels).loss.backward()
    theta = model.encoder.block[0].layer[0].SelfAttention.q.weight
    # ∂L/∂s = ∂L/∂m = θ ⊙ ∂L/∂θ'
    torch.testing.assert_close(mask_layer.scores.grad, theta * weight.grad, atol=1e-12, rtol=0)
    assert mask_layer.kept() == 128 - 3 * 16
