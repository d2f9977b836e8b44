"""Inference-time controllers: the generic loop, truncated rollouts, robust prefix-tuning, bias-tuned decoding."""

import random

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5

import deltactl as dc
from deltactl.inference import (
    RobustPrefix,
    bias_tuned_generate,
    canonical_subspace,
    fit_manifold,
    manifold_cost,
    optimize,
    pool,
    token_set_cost,
    top_layer_biases,
    truncated_rollout,
)
from deltactl.inference.attacks import drop_words, insert_trigger, perturb, swap_words, typos, universal_trigger
from deltactl.train.models import SequenceClassifier


def _classifier(layers=3, seed=0):
    bert = tiny_bert(seed, head=False, num_hidden_layers=layers)
    torch.manual_seed(seed)
    clf = SequenceClassifier(bert, 2).double().eval()
    delta = dc.attach(bert, "prefix", length=3, mid_dim=8)
    return clf, delta


def _batches(n=4, size=6, seed=3):
    return [tiny_bert_batch(seed=seed + i, batch=size, length=7) for i in range(n)]


def _snapshot(module):
    return {n: t.detach().clone() for n, t in module.state_dict(keep_vars=True).items()}


# ---- truncated rollout --------------------------------------------------------------------------------------------


def test_truncated_rollout_equals_the_full_one_and_runs_only_the_blocks_it_needs():
    clf, delta = _classifier(layers=3)
    batch = tiny_bert_batch()
    full = delta.backbone.rollout(**batch)
    calls = []
    blocks = delta.backbone.blocks()["encoder"]
    handles = [b.register_forward_hook(lambda m, a, o, j=j: calls.append(j)) for j, b in enumerate(blocks)]
    try:
        short = truncated_rollout(delta.backbone, "encoder", 2, run=clf, **batch)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0]  # h⁽⁰⁾, h⁽¹⁾ need block 0 only
    assert short.output is None and len(short["encoder"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(short["encoder"], full["encoder"]))
    whole = truncated_rollout(delta.backbone, "encoder", 4, run=clf, **batch)
    assert torch.equal(whole.output, clf(**batch))
    with pytest.raises(ValueError, match="n_states must be in 1…4"):
        truncated_rollout(delta.backbone, "encoder", 5, **batch)
    with pytest.raises(ValueError, match="no stack 'decoder'"):
        truncated_rollout(delta.backbone, "decoder", 2, **batch)


def test_truncated_rollout_of_the_t5_decoder_runs_the_whole_encoder():
    model = tiny_t5()
    backbone = dc.backbone_for(model)
    batch = tiny_batch()
    full = backbone.rollout(**batch)
    short = truncated_rollout(backbone, "decoder", 2, **batch)
    assert len(short["encoder"]) == len(full["encoder"]) and len(short["decoder"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(short["decoder"], full["decoder"]))


# ---- canonical manifold --------------------------------------------------------------------------------------------


def test_canonical_subspace_is_an_orthogonal_projector_keeping_99_percent_of_the_singular_values():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 12, generator=g, dtype=torch.float64)
    h = low + 1e-4 * torch.randn(200, 12, generator=g, dtype=torch.float64) + 5.0
    sub = canonical_subspace(h, 0.99)
    q = sub.projector
    assert sub.rank == 4
    assert torch.allclose(q, q.T, atol=1e-12) and torch.allclose(q @ q, q, atol=1e-12)
    assert torch.allclose(torch.trace(q), torch.tensor(4.0, dtype=torch.float64))
    share = sub.singular_values.cumsum(0) / sub.singular_values.sum()
    assert share[sub.rank - 1] >= 0.99 > share[sub.rank - 2]  # the smallest k that reaches the share
    assert torch.allclose(sub.mean, h.mean(0))
    assert canonical_subspace(h, 1.0).rank == 12
    x = torch.randn(3, 12, generator=g, dtype=torch.float64)
    assert torch.allclose(sub.residual(x, sub.mean), (x - sub.mean) @ (torch.eye(12, dtype=torch.float64) - q))
    with pytest.raises(ValueError, match="threshold"):
        canonical_subspace(h, 0.0)


def test_manifold_cost_is_the_papers_formula():
    clf, delta = _classifier()
    batches = _batches()
    labels = [clf(**b).argmax(-1) for b in batches]
    manifold = fit_manifold(delta, list(zip(batches, labels)), clf)
    assert manifold.examples == manifold.seen == 24  # every prediction is "correct" against its own argmax
    batch = batches[0]
    traj = delta.backbone.rollout(**batch)
    expected = 0.0
    for j in range(3):
        h = pool(traj["encoder"][j], batch["attention_mask"])
        mu = h.mean(0)
        q = manifold.layers[j].projector
        expected = expected + ((h - mu) @ q + mu - h).pow(2).mean()  # ‖h̃Q + μ − h‖², h̃ = h − μ
    cost = manifold_cost(manifold, 3, batch["attention_mask"])(traj)
    assert torch.allclose(cost, expected, rtol=1e-12)
    one = {k: v[:1] for k, v in batch.items()}  # a batch of one is not centred
    traj1 = delta.backbone.rollout(**one)
    h = pool(traj1["encoder"][1], one["attention_mask"])
    single = manifold_cost(manifold, 2, one["attention_mask"])(traj1)
    h0 = pool(traj1["encoder"][0], one["attention_mask"])
    ref = sum((x - x @ manifold.layers[j].projector).pow(2).mean() for j, x in enumerate([h0, h]))
    assert torch.allclose(single, ref, rtol=1e-12)


# ---- robust prefix ---------------------------------------------------------------------------------------------------


def _robust(steps, lr, **kw):
    clf, delta = _classifier()
    batches = _batches()
    labels = [torch.tensor([0, 1, 0, 1, 0, 1]) for _ in batches]
    manifold = fit_manifold(delta, list(zip(batches, labels)), clf)
    return clf, delta, RobustPrefix(delta, manifold, clf, n_layers=3, steps=steps, lr=lr, **kw)


def test_psi_zero_reproduces_the_trained_prefix_bit_for_bit():
    clf, delta, robust = _robust(steps=0, lr=0.1)
    batch = tiny_bert_batch(seed=9, batch=4)
    with torch.no_grad():
        plain = clf(**batch)
    assert torch.equal(robust(**batch).outputs, plain)
    robust.steps, robust.lr = 4, 0.0  # Adam at lr = 0 keeps ψ = 0
    assert torch.equal(robust(**batch).outputs, plain)


def test_robust_prefix_lowers_the_cost_changes_outputs_and_restores_everything():
    clf, delta, robust = _robust(steps=6, lr=0.05)
    batch = tiny_bert_batch(seed=9, batch=4)
    before = _snapshot(clf)
    flags = {n: p.requires_grad for n, p in clf.named_parameters()}
    with torch.no_grad():
        plain = clf(**batch)
    result = robust(**batch)
    assert len(result.costs) == 6 and result.costs[-1] < result.costs[0]
    assert not torch.equal(result.outputs, plain)
    after = _snapshot(clf)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert {n: p.requires_grad for n, p in clf.named_parameters()} == flags
    assert all(p.grad is None for p in clf.parameters())
    assert all(torch.equal(p, torch.zeros_like(p)) for p in robust.psi.values())
    assert "site_rows" not in delta.controller.__dict__
    with torch.no_grad():
        assert torch.equal(clf(**batch), plain)
    assert set(robust.psi) == {"encoder__0__attn__kv", "encoder__1__attn__kv"}  # blocks 0…N−2 only


def test_the_manifold_cost_gradient_in_psi_passes_gradcheck():
    clf, delta, robust = _robust(steps=0, lr=0.0)
    batch = tiny_bert_batch(seed=9, batch=4)
    cost = manifold_cost(robust.manifold, 3, batch["attention_mask"])
    shape = robust.psi["encoder__0__attn__kv"].shape
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(4, *shape, generator=g, dtype=torch.float64)  # ψ = Σ zᵢ Aᵢ: 4 numerical directions

    def f(z):
        psi = torch.einsum("i,i...->...", z, directions)
        return _cost_with_rows(delta, clf, batch, cost, {"encoder__0__attn__kv": psi})

    z = (0.1 * torch.randn(4, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def _cost_with_rows(delta, clf, batch, cost, shifts):
    """The cost with ψ given as plain tensors (a functional twin of ``shifted_prefix``, for gradcheck)."""
    prefix = delta.controller
    base = {s.name: prefix.site_rows(s.name).detach() for s in prefix.sites}
    prefix.__dict__["site_rows"] = lambda site: base[site] + shifts.get(site.replace(".", "__"), 0.0)
    try:
        return cost(truncated_rollout(delta.backbone, "encoder", 3, run=clf, **batch))
    finally:
        del prefix.__dict__["site_rows"]


def test_robust_prefix_refuses_other_methods_and_bad_depths():
    clf, delta, robust = _robust(steps=0, lr=0.0)
    with pytest.raises(ValueError, match="n_layers must be in 2…4"):
        RobustPrefix(delta, robust.manifold, clf, n_layers=1)
    bert = tiny_bert(head=False, num_hidden_layers=3)
    lora = dc.attach(bert, "lora", r=2)
    with pytest.raises(TypeError, match="needs an attached prefix"):
        RobustPrefix(lora, robust.manifold, clf)


# ---- the generic loop ------------------------------------------------------------------------------------------------


def test_optimize_moves_only_free_delta_and_restores_model_and_delta_bitwise():
    model = tiny_t5()
    delta = dc.attach(model, "lora", r=2)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1 * torch.randn_like(p))  # a "trained" δ, not zero
    batch = tiny_batch()
    before = _snapshot(model)
    with torch.no_grad():
        plain = model(**batch).logits

    def cost(traj):
        return traj["decoder"][-1].pow(2).mean() + traj.output.logits.pow(2).mean()

    result = optimize(delta, cost, batch, steps=3, lr=0.05, free="*decoder__1*")
    assert len(result.costs) == 3 and result.costs[-1] < result.costs[0]
    assert not torch.allclose(result.outputs.logits, plain)
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None and p.requires_grad for p in delta.parameters())
    frozen = optimize(delta, cost, batch, steps=3, lr=0.0)
    assert torch.equal(frozen.outputs.logits, plain)
    with pytest.raises(ValueError, match="matches none of δ's parameters"):
        optimize(delta, cost, batch, steps=1, lr=0.1, free="layers.nothing*")


# ---- bias-tuned decoding ---------------------------------------------------------------------------------------------


def _t5_with_bitfit():
    model = tiny_t5(num_layers=2, num_decoder_layers=2)
    batch = tiny_batch(batch=2)
    return model, batch


def test_bias_tuning_at_lr_zero_is_plain_greedy_decoding():
    model, batch = _t5_with_bitfit()
    greedy = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=5,
                            do_sample=False)
    delta = dc.attach(model, "bitfit")
    out = bias_tuned_generate(model, delta, token_set_cost(range(2, 30)), batch["input_ids"], batch["attention_mask"],
                              max_new_tokens=5, layers=2, steps=1, lr=0.0)
    assert torch.equal(out.sequences, greedy)


def test_bias_tuning_moves_mass_off_a_token_set_and_restores_the_biases():
    model, batch = _t5_with_bitfit()
    delta = dc.attach(model, "bitfit")
    before = _snapshot(model)
    plain = bias_tuned_generate(model, delta, token_set_cost([0]), batch["input_ids"], batch["attention_mask"],
                                max_new_tokens=5, layers=0)
    banned = sorted(set(plain.sequences[:, 1:].flatten().tolist()) - {1})  # the tokens greedy decoding emits
    away = bias_tuned_generate(model, delta, token_set_cost(banned), batch["input_ids"], batch["attention_mask"],
                               max_new_tokens=5, layers=2, steps=3, lr=0.5, mix=1.0)
    share = lambda seq: torch.isin(seq[:, 1:], torch.tensor(banned)).float().mean().item()  # noqa: E731
    assert share(plain.sequences) == 1.0 and share(away.sequences) < 1.0
    after = _snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_the_redo_loop_shrinks_the_tuned_layers_until_the_perplexity_passes():
    model, batch = _t5_with_bitfit()
    delta = dc.attach(model, "bitfit")
    greedy = bias_tuned_generate(model, delta, token_set_cost([0]), batch["input_ids"], batch["attention_mask"],
                                 max_new_tokens=3, layers=0)
    out = bias_tuned_generate(model, delta, token_set_cost(range(2, 40)), batch["input_ids"],
                              batch["attention_mask"], max_new_tokens=3, layers=2, steps=1, lr=0.5,
                              max_perplexity=0.5)  # unreachable: a perplexity is ≥ 1
    assert [t for t, _ in out.attempts] == [2, 1, 0] and out.layers == 0
    assert torch.equal(out.sequences, greedy.sequences)
    assert len(top_layer_biases(delta, 1)) < len(top_layer_biases(delta, 2))
    with pytest.raises(ValueError, match="tuned layers must be in 0…2"):
        top_layer_biases(delta, 3)


# ---- attacks ------------------------------------------------------------------------------------------------------


def test_perturbations_are_seeded_and_do_what_they_say():
    text = "the movie was wonderfully acted but painfully slow"
    assert perturb([text], "typo", 0.5, 1) == perturb([text], "typo", 0.5, 1)
    assert typos(text, 0.0, random.Random(0)) == text
    edited = typos(text, 1.0, random.Random(0)).split()
    assert all(a != b for a, b in zip(edited, text.split()) if len(b) >= 3)
    assert drop_words(text, 1.0, random.Random(0)) == "the"  # one word is always kept
    assert sorted(swap_words(text, 1.0, random.Random(0)).split()) == sorted(text.split())
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb([text], "shout", 0.1, 0)


def test_universal_trigger_lowers_the_target_loss():
    clf, delta = _classifier()
    batches = [(b, None) for b in _batches(1)]
    vocab = torch.arange(2, 64)
    embeddings = delta.backbone.input_embeddings()
    trigger = universal_trigger(clf, embeddings, batches, target=1, length=2, vocabulary=vocab, init_id=5,
                                iterations=1, candidates=3)

    def loss(trig):
        with torch.no_grad():
            logits = torch.cat([clf(**insert_trigger(b, trig)) for b, _ in batches])
        return torch.nn.functional.cross_entropy(logits, torch.ones(len(logits), dtype=torch.long)).item()

    assert trigger.shape == (2,) and loss(trigger) <= loss(torch.tensor([5, 5]))
    widened = insert_trigger(batches[0][0], trigger)
    assert widened["input_ids"].shape[1] == batches[0][0]["input_ids"].shape[1] + 2
    assert torch.equal(widened["input_ids"][:, 1:3], trigger.expand(6, -1))
