"""The training loop: resume gives the uninterrupted result, NaN stops with the best δ kept, early stopping, logs."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_t5

import deltactl as dc
from deltactl.train.loop import TrainConfig, fit


def synthetic_pairs(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, VOCAB, (6,), generator=g), torch.randint(2, VOCAB, (3,), generator=g)) for _ in range(n)]


def collate(pairs):
    return {"input_ids": torch.stack([a for a, _ in pairs]), "labels": torch.stack([b for _, b in pairs])}


def setup(dropout=0.1):
    model = tiny_t5(dtype=torch.float32, dropout_rate=dropout)
    delta = dc.attach(model, "lora", r=2, dropout=0.1)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, delta, trainable


def run(out, config, loss_fn=None, metric=None):
    model, delta, trainable = setup()
    data = synthetic_pairs()
    evals = iter(metric or [])

    def evaluate():
        if metric is not None:
            return {"score": next(evals)}
        with torch.no_grad():
            return {"score": -model(**collate(data[:8])).loss.item()}

    outcome = fit(
        model, trainable, data, collate, loss_fn or (lambda m, b: m(**b).loss), evaluate, "score", config, out,
        save_best=lambda folder: delta.save(folder),
    )
    return outcome, {n: p.detach().clone() for n, p in trainable.items()}


CONFIG = TrainConfig(lr=1e-2, epochs=2.5, batch_size=5, eval_every=4, seed=3)


def test_resume_ends_with_the_uninterrupted_delta(tmp_path):
    whole, expected = run(tmp_path / "whole", CONFIG)
    assert whole.status == "finished" and whole.steps == 13  # ceil(24/5) = 5 steps an epoch · 2.5

    first, _ = run(tmp_path / "split", TrainConfig(**{**CONFIG.__dict__, "stop_after": 6}))
    assert first.status == "halted" and first.steps == 6
    second, resumed = run(tmp_path / "split", CONFIG)
    assert second.status == "finished" and second.steps == 13
    assert all(torch.equal(resumed[n], expected[n]) for n in expected)
    log = lambda p: [json.loads(x) for x in (p / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(tmp_path / "split") == log(tmp_path / "whole")  # same evaluations, none twice
    assert [e["step"] for e in log(tmp_path / "whole")] == [4, 8, 12, 13]


def test_non_finite_loss_stops_and_keeps_the_best(tmp_path, capsys):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * float("nan") if calls["n"] == 6 else loss

    outcome, _ = run(tmp_path, CONFIG, loss_fn=loss_fn)
    assert outcome.status == "diverged" and outcome.steps == 5 and outcome.best_step == 4
    assert "training loss became nan at step 6" in capsys.readouterr().out
    assert (tmp_path / "best" / "delta.safetensors").exists()


def test_early_stopping_after_patience(tmp_path):
    config = TrainConfig(**{**CONFIG.__dict__, "eval_every": 1, "patience": 2})
    outcome, _ = run(tmp_path, config, metric=[0.5, 0.7, 0.6, 0.65, 0.9, 0.1, 0.1, 0.1])
    assert outcome.status == "early-stopped" and outcome.steps == 4 and outcome.best_metric == 0.7
    assert outcome.best_step == 2


def test_best_delta_is_the_best_evaluation(tmp_path):
    outcome, _ = run(tmp_path, CONFIG)
    best = json.loads((tmp_path / "outcome.json").read_text())
    log = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert best["best_metric"] == max(e["score"] for e in log) == outcome.best_metric
    assert [e["step"] for e in log if e["score"] == outcome.best_metric] == [outcome.best_step]
    # The kept δ, loaded onto a fresh base and scored again (a second path), reproduces the best score; the final
    # δ does not (it was evaluated lower), so best/ is not just the last δ.
    fresh = tiny_t5(dtype=torch.float32, dropout_rate=0.1)
    dc.load(fresh, tmp_path / "best")
    with torch.no_grad():
        rescored = -fresh(**collate(synthetic_pairs()[:8])).loss.item()
    assert rescored == pytest.approx(outcome.best_metric, abs=1e-6)


def test_each_process_resumes_its_own_generator(tmp_path):
    """A checkpoint of two processes keeps both generators; each rank gets its own back (a new rank, the main's)."""
    from deltactl.train.checkpoint import generator_states, load_checkpoint, save_checkpoint

    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(generator_states())
    save_checkpoint(tmp_path / "checkpoint", {"w": weight}, optimizer, scheduler, {"step": 0}, generators=states)
    for rank, seed in ((0, 1), (1, 2), (2, 1)):
        torch.manual_seed(99)
        load_checkpoint(tmp_path / "checkpoint", {"w": weight}, optimizer, scheduler, rank=rank)
        torch.manual_seed(seed)
        expected = torch.rand(4)
        load_checkpoint(tmp_path / "checkpoint", {"w": weight}, optimizer, scheduler, rank=rank)
        assert torch.equal(torch.rand(4), expected), rank


def test_an_accelerate_config_that_shards_the_model_is_refused(monkeypatch):
    from deltactl.train.processes import check_engine

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="shard the model with FSDP .* deltactl train does not do: it replicates"):
        check_engine()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_engine()
