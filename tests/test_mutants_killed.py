"""Checks against independent references for behaviour that small, plausible bugs once broke without a failing test.

Each test names the wrong implementation it rules out; ``tools/mutants.py`` plants those bugs and expects these
tests to fail on them.
"""

import copy
import json

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from safetensors.torch import load_file
from test_inference import _batches, _classifier
from test_train_loop import collate, synthetic_pairs

import deltactl as dc
from deltactl.control.controller import site_key
from deltactl.control.root import base_named_parameters
from deltactl.inference.attacks import insert_trigger, universal_trigger
from deltactl.train.loop import TrainConfig, fit

# ---- prefix -------------------------------------------------------------------------------------------------------


def test_cross_attention_prefix_equals_encoder_rows_prepended():
    """Rows (Kₚ, Vₚ) = (Wₖ e, Wᵥ e) on every decoder cross-attention act as encoder states e placed before the
    encoder's output: the reference is the unwrapped model fed [e; encoder output] with the mask widened.
    Rules out a cross-attention memory that returns no rows (a no-op) or ignores the rows' values."""
    model = tiny_t5(d_kv=8)  # heads · d_kv = d_model
    ref = copy.deepcopy(model)
    batch = tiny_batch()
    with torch.no_grad():
        base = model(**batch).logits
    delta = dc.attach(model, "prefix", sites=("decoder.*.cross.kv",), length=3, reparameterize=False)
    e = torch.randn(3, model.config.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for site in delta.controller.sites:
            attention = model.get_submodule(site.module)
            rows = torch.cat([e @ attention.k.weight.T, e @ attention.v.weight.T], dim=1)
            delta.controller.rows[site_key(site.name)].copy_(rows)
        out = model(**batch).logits
        encoded = ref.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        states = torch.cat([e.expand(encoded.shape[0], -1, -1), encoded], dim=1)
        mask = torch.cat([torch.ones(encoded.shape[0], 3, dtype=torch.long), batch["attention_mask"]], dim=1)
        dec = batch["decoder_input_ids"]
        expected = ref(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=dec).logits
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_reparameterised_prefix_rows_are_slices_of_one_mlp_output():
    """Kₚ, Vₚ of all sites = W₂ tanh(W₁ E + b₁) + b₂, cut into consecutive per-site blocks in site order.
    Rules out every site reading the same block (a zero offset) or a misplaced slice."""
    model = tiny_t5()
    delta = dc.attach(model, "prefix", length=2, mid_dim=6)
    prefix = delta.controller
    with torch.no_grad():
        prefix.mlp_out.bias.normal_()
        full = prefix.mlp_out(torch.tanh(prefix.mlp_in(prefix.embedding)))
        blocks = [prefix.site_rows(s.name) for s in prefix.sites]
    assert len(blocks) > 2 and full.shape[1] == sum(b.shape[1] for b in blocks)
    torch.testing.assert_close(torch.cat(blocks, dim=1), full, atol=0, rtol=0)
    assert not torch.allclose(blocks[0], blocks[1])


# ---- accounting and fingerprints ----------------------------------------------------------------------------------


def _unique_storage_count(model) -> int:
    """Parameters counted once per storage (tied tensors share one), listing every module's own slots."""
    seen = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                seen[p.untyped_storage().data_ptr()] = p.numel()
    return sum(seen.values())


def test_count_counts_tied_embeddings_once():
    """T5 v1.0 ties the shared embedding, both stacks' embed_tokens and the LM head to one tensor."""
    model = tiny_t5()
    assert model.shared.weight is model.lm_head.weight is model.encoder.embed_tokens.weight
    listed_twice = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    unique = _unique_storage_count(model)
    assert listed_twice > unique  # the tie is there: the check can tell the two apart
    assert dc.count(model).base == unique
    delta = dc.attach(model, "lora", r=2)
    counted = dc.count(model)
    assert counted.base == unique and counted.trainable == delta.num_parameters() == counted.deltas["lora"]
    assert counted.percent == pytest.approx(100 * delta.num_parameters() / unique)
    assert dc.fingerprint(model)["parameters"] == unique


def test_fingerprint_sees_a_change_in_any_single_base_weight():
    """Every base tensor (first and last included) enters the SHA-256: changing one element of any of them changes
    it. Rules out a fingerprint over a slice of the parameter list."""
    model = tiny_bert()
    reference = dc.fingerprint(model)["sha256"]
    params = base_named_parameters(model)
    assert len(params) > 10
    for name, p in params:
        with torch.no_grad():
            old = p.view(-1)[0].item()
            p.view(-1)[0] += 1.0
            changed = dc.fingerprint(model)["sha256"]
            p.view(-1)[0] = old
        assert changed != reference, name
    assert dc.fingerprint(model)["sha256"] == reference


def test_a_delta_saved_while_merged_loads_onto_the_clean_base(tmp_path):
    """Saving records the fingerprint of the unmerged base, so the file loads onto a fresh copy of that base and
    gives the merged model's outputs. Rules out fingerprinting the merged weights (then the load is refused)."""
    model = tiny_bert()
    fresh = copy.deepcopy(model)
    batch = tiny_bert_batch()
    delta = dc.attach(model, "lora", r=2)
    with torch.no_grad():
        for layer in delta.controller.layers.values():
            layer.B.normal_()
        delta.merge()
        expected = model(**batch).logits
    delta.save(tmp_path / "d")
    loaded = dc.load(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-10, rtol=0)
    assert not loaded.merged


# ---- LoRA dropout -------------------------------------------------------------------------------------------------


def test_lora_dropout_acts_only_in_training_mode():
    """In eval mode the output is deterministic and equals the merged weights' output (W + (α/r) B A, a second path
    with no dropout); in training mode dropout changes it. Rules out dropout left on in eval mode."""
    model = tiny_bert()
    batch = tiny_bert_batch()
    delta = dc.attach(model, "lora", r=2, dropout=0.5)
    with torch.no_grad():
        for layer in delta.controller.layers.values():
            layer.B.normal_()
        model.eval()
        first, second = model(**batch).logits, model(**batch).logits
        model.train()
        torch.manual_seed(0)
        trained = model(**batch).logits
        model.eval()
        delta.merge()
        merged = model(**batch).logits
        delta.unmerge()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, merged, atol=1e-10, rtol=0)
    assert (trained - first).abs().max() > 1e-6


# ---- the training loop --------------------------------------------------------------------------------------------


def _fit(out, config, metrics, nan_at=None):
    """A LoRA run on the tiny T5 whose evaluations return ``metrics`` in turn; δ is snapshotted at each evaluation
    and at the call that returns a NaN loss (``nan_at``, 1-based)."""
    model = tiny_t5(dtype=torch.float32, dropout_rate=0.0)
    delta = dc.attach(model, "lora", r=2)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    evals, snapshots, calls = iter(metrics), {}, {"n": 0}

    def state():
        return {k: v.detach().clone() for k, v in delta.controller.state_dict().items()}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = m(**batch).loss
        if calls["n"] == nan_at:
            snapshots["nan"] = state()
            return loss * float("nan")
        return loss

    def evaluate():
        snapshots[len(snapshots)] = state()
        return {"score": next(evals)}

    outcome = fit(model, trainable, synthetic_pairs(), collate, loss_fn, evaluate, "score", config, out,
                  save_best=lambda folder: delta.save(folder))
    return outcome, snapshots, state()


def _saved_best(folder):
    return load_file(str(folder / "best" / "delta.safetensors"))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


LOOP = TrainConfig(lr=1e-2, epochs=2.5, batch_size=5, eval_every=2, seed=3)


def test_best_is_written_only_when_the_metric_improves(tmp_path):
    """best/ holds δ as it was at the best evaluation, although later, worse evaluations saw another δ.
    Rules out rewriting best/ at every evaluation."""
    config = TrainConfig(**{**LOOP.__dict__, "epochs": 1.2})  # 6 steps: evaluations at 2, 4, 6
    outcome, snapshots, final = _fit(tmp_path, config, [0.5, 0.9, 0.3])
    assert outcome.best_step == 4 and outcome.best_metric == 0.9
    assert _equal(_saved_best(tmp_path), snapshots[1]) and not _equal(snapshots[1], snapshots[2])
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["best"]) for e in log] == [(2, True), (4, True), (6, False)]


def test_divergence_leaves_best_and_delta_as_they_were(tmp_path):
    """A NaN loss at step 7 stops the run before any optimiser step: δ ends as it was when that loss was computed,
    and best/ still holds δ of the best evaluation (step 4). Rules out a NaN step applied before stopping, and
    a divergence that saves the current δ as best."""
    outcome, snapshots, final = _fit(tmp_path, LOOP, [0.5, 0.9, 0.3], nan_at=7)
    assert outcome.status == "diverged" and outcome.steps == 6 and outcome.best_step == 4
    assert all(torch.isfinite(v).all() for v in final.values())
    assert _equal(final, snapshots["nan"])
    assert _equal(_saved_best(tmp_path), snapshots[1]) and not _equal(snapshots[1], snapshots["nan"])


def test_resume_drops_evaluations_logged_after_the_checkpoint(tmp_path):
    """A run killed after logging an evaluation but before checkpointing it redoes that evaluation on resume: the
    log keeps each evaluation once, and the checkpoint's own evaluation is kept. Rules out a resume that keeps the
    stale rows, or drops the row of the checkpoint's step."""
    config = TrainConfig(lr=1e-2, epochs=2.5, batch_size=5, eval_every=4, seed=3)
    first, _, _ = _fit(tmp_path, TrainConfig(**{**config.__dict__, "stop_after": 8}), [0.1, 0.2])
    assert first.status == "halted" and first.steps == 8
    with open(tmp_path / "log.jsonl", "a") as log:  # what a kill between logging step 12 and its checkpoint leaves
        log.write(json.dumps({"step": 12, "train_loss": 0.0, "score": 99.0, "best": True}) + "\n")
    second, _, _ = _fit(tmp_path, config, [0.3, 0.4])
    assert second.status == "finished" and second.steps == 13
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(e["step"], e["score"]) for e in log] == [(4, 0.1), (8, 0.2), (12, 0.3), (13, 0.4)]


def test_weight_decay_applies_to_matrices_and_not_to_vectors(tmp_path):
    """One AdamW step equals torch's AdamW with decay on the matrices (ndim > 1) and none on biases and norms.
    Rules out swapped groups."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    trainable = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in trainable.items()}
    config = TrainConfig(lr=0.1, epochs=1, batch_size=1, weight_decay=0.5, max_grad_norm=0.0, eval_every=1)
    x = torch.randn(2, 3)

    def loss_fn(m, batch):
        return m(x).pow(2).sum()

    fit(model, trainable, [0], lambda items: {}, loss_fn, lambda: {"score": 0.0}, "score", config, tmp_path,
        save_best=lambda folder: None)

    w = start["weight"].clone().requires_grad_(True)
    b = start["bias"].clone().requires_grad_(True)
    (x @ w.T + b).pow(2).sum().backward()
    reference = torch.optim.AdamW([{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    reference.step()
    torch.testing.assert_close(model.weight.detach(), w.detach(), atol=1e-7, rtol=0)
    torch.testing.assert_close(model.bias.detach(), b.detach(), atol=1e-7, rtol=0)
    # and the decay is visible: the same step without it moves the weight elsewhere
    w2 = start["weight"].clone().requires_grad_(True)
    (x @ w2.T + b.detach()).pow(2).sum().backward()
    torch.optim.AdamW([w2], lr=0.1, weight_decay=0.0).step()
    assert (w2.detach() - w.detach()).abs().max() > 1e-3


# ---- universal triggers -------------------------------------------------------------------------------------------


def test_trigger_search_over_the_whole_vocabulary_finds_the_exact_minimum():
    """With one trigger token, one pass and every vocabulary id evaluated exactly, the HotFlip search must return
    the id of lowest target loss (brute force over the vocabulary is the reference). Rules out a search that
    never takes an improving candidate."""
    clf, delta = _classifier()
    batches = [(b, None) for b in _batches(2)]
    vocab = torch.arange(2, 40)
    embeddings = delta.backbone.input_embeddings()

    def loss(trig):
        with torch.no_grad():
            logits = torch.cat([clf(**insert_trigger(b, trig)) for b, _ in batches])
        return torch.nn.functional.cross_entropy(logits, torch.ones(len(logits), dtype=torch.long)).item()

    exact = {int(i): loss(torch.tensor([int(i)])) for i in vocab}
    best_id = min(exact, key=exact.get)
    init = max(exact, key=exact.get)  # start from the worst, so the search has to move
    trigger = universal_trigger(clf, embeddings, batches, target=1, length=1, vocabulary=vocab, init_id=init,
                                iterations=1, candidates=len(vocab))
    assert int(trigger[0]) != init
    assert loss(trigger) == pytest.approx(exact[best_id], abs=1e-12)


def test_a_combination_penalises_with_the_sum_of_its_parts():
    """chain(a, b) and sum(a, b) of two penalised deltas (diff pruning on different sites): the combined penalty is
    a's plus b's, each computed on its own. Rules out a total that keeps only one part's penalty."""
    from deltactl.methods import make_example

    model = tiny_bert()
    a = make_example("diff_pruning", sites=("*.q.weight",))
    b = make_example("diff_pruning", sites=("*.v.weight",))
    alone = []
    for cfg in (a, b):
        delta = dc.attach(model, cfg)
        alone.append(delta.controller.penalty().item())
        delta.detach()
    assert min(alone) > 0
    delta = dc.attach(model, dc.chain(a, b))
    torch.testing.assert_close(delta.controller.penalty().item(), sum(alone), atol=1e-12, rtol=0)


def test_every_planted_mutant_still_finds_its_line():
    """A mutant whose snippet has gone from its file (the code was rewritten) plants nothing and proves nothing."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "mutants.py"
    spec = importlib.util.spec_from_file_location("deltactl_mutants", path)
    mutants = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutants  # its dataclasses look their module up there
    spec.loader.exec_module(mutants)
    assert mutants._check(list(enumerate(mutants.MUTANTS, 1))) == []
