"""Faults: a kill at every step of a save, corrupted or edited files, bad input. Nothing is lost, nothing is silent."""

import json
import shutil

import pytest
import torch
from conftest import tiny_t5
from test_train_loop import collate, synthetic_pairs

import deltactl as dc
from deltactl.control import io
from deltactl.train.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from deltactl.train.loop import TrainConfig, fit


class Killed(BaseException):
    """A simulated kill -9: not an Exception, so no cleanup code catches it."""


def kill_after(monkeypatch, k):
    """Make the k-th durable step of any write (1-based) the last one before the process 'dies'."""
    seen = []

    def step(what):
        seen.append(what)
        if len(seen) == k:
            raise Killed(what)

    monkeypatch.setattr(io, "_step", step)
    return seen


def lora(model, value):
    delta = dc.attach(model, "lora", r=2)
    with torch.no_grad():
        for p in delta.parameters():
            p.fill_(value)
    return delta


def values(delta):
    return {k: v.clone() for k, v in delta.controller.state_dict().items()}


# --- atomic δ saves -------------------------------------------------------------------------------------------


def test_a_kill_at_every_step_of_a_delta_save_leaves_the_old_or_the_new_delta(tmp_path, monkeypatch):
    model = tiny_t5()
    old, new, later = lora(model, 0.25), lora(model, 0.5), lora(model, 0.75)
    expected = {"old": values(old), "new": values(new)}
    old.save(tmp_path / "clean")
    k = 0
    while True:
        k += 1
        folder = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "clean", folder)
        seen = kill_after(monkeypatch, k)
        try:
            new.save(folder)
            killed = False
        except Killed:
            killed = True
        monkeypatch.setattr(io, "_step", lambda what: None)
        loaded = dc.load(model, folder, name="check")
        got = values(loaded)
        loaded.detach()
        which = [w for w, v in expected.items() if all(torch.equal(got[n], v[n]) for n in v)]
        assert len(which) == 1, f"after step {k} ({seen[-1]}) the δ is neither the old nor the new one"
        if "replaced delta.json.new" in seen:  # past the commit point, the new δ wins
            assert which == ["new"]
        later.save(folder)  # the next save recovers whatever the kill left
        assert sorted(p.name for p in folder.iterdir()) == ["delta.json", "delta.safetensors"]
        reloaded = dc.load(model, folder, name="check")
        assert all(torch.equal(v, values(later)[n]) for n, v in values(reloaded).items())
        reloaded.detach()
        if not killed:
            break
    assert k >= 4  # two files written, each a temp write + a rename, then the commit


def test_flipped_byte_or_edited_json_is_refused_naming_the_file(tmp_path):
    model = tiny_t5()
    delta = lora(model, 0.5)
    delta.save(tmp_path)
    delta.detach()
    tensors = tmp_path / "delta.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's bytes
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{tensors}.*does not match the content hash"):
        dc.load(model, tmp_path)
    assert dc.deltas(model) == {}  # the refused δ left nothing attached
    dc.load(model, tmp_path, verify=False).detach()  # the escape for deliberate edits
    data[-3] ^= 0x01
    tensors.write_bytes(bytes(data))
    config = tmp_path / "delta.json"
    meta = json.loads(config.read_text())
    meta["config"]["alpha"] = 4.0
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{config} was changed after it was saved"):
        dc.load(model, tmp_path)
    assert dc.load(model, tmp_path, verify=False).config.alpha == 4.0
    config.write_text(config.read_text()[:40])
    with pytest.raises(ValueError, match=rf"{config} is not valid JSON"):
        dc.load(model, tmp_path)


def _rewrite_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "delta.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "delta.safetensors"))


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({k: torch.zeros(3, 5) for k in list(t)[:1]}),
     r"holds '.*' with shape \(3, 5\), but this lora on this model has shape \(2, \d+\) there"),
    (lambda t: t.pop(sorted(t)[0]), r"has no tensor '.*', which this lora needs \(1 missing of \d+\)"),
    (lambda t: t.update({"extra.weight": torch.zeros(2)}), r"holds 'extra.weight', which this lora does not have"),
    (lambda t: t.update({k: torch.ones(t[k].shape, dtype=torch.int64) for k in list(t)[:1]}),
     r"holds '.*' as int64, but this lora keeps it as float32"),
])
def test_unverified_tensors_that_do_not_fit_are_named(tmp_path, change, message):
    model = tiny_t5(dtype=torch.float32)
    lora(model, 0.5).save(tmp_path)
    dc.deltas(model)["lora"].detach()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _rewrite_tensors(tmp_path, change)
    with pytest.raises(ValueError, match="content hash"):
        dc.load(model, tmp_path)
    with pytest.raises(ValueError, match=message):
        dc.load(model, tmp_path, verify=False)
    assert dc.deltas(model) == {} and not hasattr(model, "deltactl")  # nothing left attached
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unverified_config_edit_that_changes_shapes_is_named(tmp_path):
    model = tiny_t5(dtype=torch.float32)
    lora(model, 0.5).save(tmp_path)
    dc.deltas(model)["lora"].detach()
    config = tmp_path / "delta.json"
    meta = json.loads(config.read_text())
    meta["config"]["r"] = 4
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"with shape \(2, \d+\), but this lora on this model has shape \(4, \d+\)"):
        dc.load(model, tmp_path, verify=False)


# --- atomic checkpoints and run folders ------------------------------------------------------------------------


def test_a_changed_checkpoint_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, *_state(1), {"step": 1})
    tensors = folder / "state.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0x01
    tensors.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{tensors} does not match the content hash stored in state.json"):
        load_checkpoint(folder, *_state(0))
    save_checkpoint(folder, *_state(1), {"step": 1})
    config = folder / "state.json"
    meta = json.loads(config.read_text())
    meta["progress"]["step"] = 7
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{config} does not match its stored content hash"):
        load_checkpoint(folder, *_state(0))
    tensors.write_bytes(tensors.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{tensors} cannot be read as safetensors"):
        load_checkpoint(folder, *_state(0))



def _state(value):
    param = torch.nn.Parameter(torch.full((3,), float(value)))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return {"w": param}, optimizer, scheduler


def test_a_kill_at_every_step_of_a_checkpoint_leaves_one_that_loads(tmp_path, monkeypatch):
    k = 0
    while True:
        k += 1
        folder = tmp_path / f"k{k}" / "checkpoint"
        save_checkpoint(folder, *_state(1), {"step": 1})
        kill_after(monkeypatch, k)
        try:
            save_checkpoint(folder, *_state(2), {"step": 2})
            killed = False
        except Killed:
            killed = True
        monkeypatch.setattr(io, "_step", lambda what: None)
        assert has_checkpoint(folder)
        trainable, optimizer, scheduler = _state(0)
        progress = load_checkpoint(folder, trainable, optimizer, scheduler)
        assert trainable["w"].tolist() == [float(progress["step"])] * 3  # whole: the old one or the new one
        save_checkpoint(folder, *_state(3), {"step": 3})  # the next save recovers (it crashed here before)
        assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]
        assert load_checkpoint(folder, *_state(0)) == {"step": 3}
        if not killed:
            break
    assert k >= 3


def test_a_half_removed_checkpoint_old_does_not_block_the_next_save(tmp_path):
    """The state of issue 20: killed after the swap, while checkpoint.old was being removed."""
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, *_state(1), {"step": 1})
    shutil.copytree(folder, tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.old" / "state.json").unlink()
    save_checkpoint(folder, *_state(2), {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert load_checkpoint(folder, *_state(0)) == {"step": 2}


def _fit(out, config):
    torch.manual_seed(0)
    model = tiny_t5(dtype=torch.float32, dropout_rate=0.1)
    delta = dc.attach(model, "lora", r=2, dropout=0.1)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    data = synthetic_pairs(12)

    def evaluate():
        with torch.no_grad():
            return {"score": -model(**collate(data[:4])).loss.item()}

    outcome = fit(model, trainable, data, collate, lambda m, b: m(**b).loss, evaluate, "score", config, out,
                  save_best=lambda folder: delta.save(folder))
    return outcome, {n: p.detach().clone() for n, p in trainable.items()}


def test_a_kill_at_every_step_of_training_writes_resumes_to_the_same_delta(tmp_path, monkeypatch):
    config = TrainConfig(lr=1e-2, epochs=1.0, batch_size=4, eval_every=2, seed=3)  # 3 steps, evaluations at 2, 3
    whole, expected = _fit(tmp_path / "whole", config)
    k = 0
    while True:
        k += 1
        out = tmp_path / f"k{k}"
        kill_after(monkeypatch, k)
        try:
            _fit(out, config)
            killed = False
        except Killed:
            killed = True
        monkeypatch.setattr(io, "_step", lambda what: None)
        outcome, resumed = _fit(out, config)
        assert outcome.steps == whole.steps and outcome.best_step == whole.best_step
        assert all(torch.equal(resumed[n], expected[n]) for n in expected), f"kill after step {k}"
        assert (out / "log.jsonl").read_text() == (tmp_path / "whole" / "log.jsonl").read_text()
        best = dc.load(tiny_t5(dtype=torch.float32, dropout_rate=0.1), out / "best")
        assert best.num_parameters() > 0
        if not killed:
            break
    assert k > 10


# --- bad input: one line naming the option, the value and what is allowed; nothing written ------------------------

try:
    from deltactl.tasks import data_dir

    DATA = str(data_dir())
except FileNotFoundError:
    DATA = None

BAD_TRAIN = [  # (extra argv, expected error text)
    (["--lr", "-0.1"], "--lr -0.1: must be a finite number > 0"),
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--method", "lora:r=0"], "LoRA rank r must be ≥ 1, got 0"),
    (["--method", "lora:r=eight"], "lora option r='eight': must be a whole number"),
    (["--method", "lora:r=2.5"], "lora option r=2.5: must be a whole number"),
    (["--batch-size", "0"], "--batch-size 0: must be a whole number ≥ 1"),
    (["--eval-every", "0"], "--eval-every 0: must be a whole number ≥ 1"),
    (["--epochs", "0"], "--epochs 0.0: must be a number > 0"),
    (["--patience", "-1"], "--patience -1: must be a whole number ≥ 0"),
    (["--max-length", "0"], "--max-length 0: must be a whole number ≥ 1"),
    (["--stop-after", "0"], "--stop-after 0: must be a whole number ≥ 1"),
    (["--method", "lora:sites=*.nothing"], "pattern '*.nothing'"),
    (["--method", "prompt:length=0"], "the delta has 0 trainable parameters"),
    (["--task", "sst3"], "unknown task 'sst3'"),
]


def _disk(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*"))


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
@pytest.mark.parametrize("extra, message", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_option_is_one_line_and_writes_nothing(extra, message, t5_folder, tmp_path, monkeypatch, capsys):
    from deltactl.cli import main

    monkeypatch.chdir(tmp_path)
    before = _disk(tmp_path)
    argv = ["train", "--method", "lora", "--task", "sst2", "--model", str(t5_folder), "--kshot-seed", "13",
            "--data", DATA, "--out", str(tmp_path / "run"), "--epochs", "0.25", *extra]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltactl ")]
    assert len(errors) == 1 and message in errors[0], errors  # one line (loading progress bars aside)
    assert _disk(tmp_path) == before  # no run folder, no run.json


@pytest.mark.parametrize("argv, message", [
    (["inspect", "--model", "/nonexistent"], "--model /nonexistent: is not a folder"),
    (["count", "--model", "/nonexistent"], "--model /nonexistent: is not a folder"),
    (["inspect", "--shape", "t5-tiny", "--method", "lora:dropout=high"],
     "lora option dropout='high': must be a number"),
])
def test_bad_inspect_input_is_one_line(argv, message, capsys):
    from deltactl.cli import main

    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltactl ")]
    assert len(errors) == 1 and message in errors[0], errors  # one line (loading progress bars aside)


def test_sites_matching_nothing_is_an_error():
    model = tiny_t5()
    with pytest.raises(ValueError, match=r"lora with sites=\(\) acts on no site \(0 trainable parameters\)"):
        dc.attach(model, "lora", sites=())
    assert dc.deltas(model) == {}


# --- attach is all or nothing -----------------------------------------------------------------------------------


def _snapshot(model):
    return ([(n, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
            [(n, type(m).__name__, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()])


def _same(a, b):
    (pa, ma), (pb, mb) = a, b
    return ma == mb and [(n, g) for n, g, _ in pa] == [(n, g) for n, g, _ in pb] and all(
        torch.equal(x, y) for (_, _, x), (_, _, y) in zip(pa, pb))


@pytest.mark.parametrize("already", [False, True], ids=["bare", "with-a-delta"])
def test_a_failing_attach_leaves_the_model_as_it_was(already, monkeypatch):
    model = tiny_t5()
    if already:
        dc.attach(model, "bitfit")
    before = _snapshot(model)
    for bad in (dict(r="eight"), dict(r=2.5), dict(r=0), dict(sites=("*.q", "*.nothing")), dict(sites=())):
        with pytest.raises(ValueError):
            dc.attach(model, "lora", **bad)
        assert _same(_snapshot(model), before), bad
    from deltactl.control import attach as attach_module

    calls = {"n": 0}
    real_hook = type(attach_module.backbone_for(model)).hook

    def hook(self, site, law):  # the third site's hook fails
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("hook failed on the third site")
        return real_hook(self, site, law)

    monkeypatch.setattr(type(attach_module.backbone_for(model)), "hook", hook)
    with pytest.raises(RuntimeError, match="third site"):
        dc.attach(model, "lora", r=2)
    assert _same(_snapshot(model), before)
    assert list(dc.deltas(model)) == (["bitfit"] if already else [])


# --- divergence -------------------------------------------------------------------------------------------------


def test_a_loss_blow_up_stops_training_and_keeps_the_best(tmp_path, capsys):
    from test_train_loop import CONFIG, run

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        return loss * 1000 if calls["n"] == 12 else loss  # finite, but 1000× the usual

    outcome, _ = run(tmp_path, CONFIG, loss_fn=loss_fn)
    assert outcome.status == "diverged" and outcome.steps == 11 and outcome.best_step == 8
    assert "the training loss jumped to" in capsys.readouterr().out
    assert dc.load(tiny_t5(dtype=torch.float32, dropout_rate=0.1), tmp_path / "best").num_parameters() > 0


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
def test_a_diverged_run_exits_non_zero(t5_folder, tmp_path, capsys, monkeypatch):
    from deltactl.cli import main
    from deltactl.train import run

    real_fit = run.fit

    def fit_going_nan(model, trainable, train_set, collate, loss_fn, *rest):  # the loss is NaN from step 6 on
        calls = {"n": 0}

        def nan_loss(model, batch):
            calls["n"] += 1
            return loss_fn(model, batch) * (float("nan") if calls["n"] >= 6 else 1.0)

        return real_fit(model, trainable, train_set, collate, nan_loss, *rest)

    monkeypatch.setattr(run, "fit", fit_going_nan)
    argv = ["train", "--method", "lora:r=4", "--task", "sst2", "--model", str(t5_folder), "--kshot-seed", "13",
            "--data", DATA, "--out", str(tmp_path / "run"), "--epochs", "3", "--batch-size", "4", "--eval-every", "4",
            "--max-length", "32"]
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert "training loss became nan at step 6" in captured.out and "\ndiverged: lora" in captured.out
    assert "deltactl train: training diverged" in captured.err


# --- half-written run files -------------------------------------------------------------------------------------


def test_half_written_run_files_name_the_file(tmp_path):
    from deltactl.train import run
    from deltactl.train.loop import _truncate_log, read_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 2, "score": 1.0}\n{"step": 4, "sco')  # killed mid-line: the partial entry is dropped
    assert read_log(log) == [{"step": 2, "score": 1.0}]
    _truncate_log(log, 4)
    assert log.read_text() == '{"step": 2, "score": 1.0}\n'
    log.write_text('{"step": 2, "sco\n{"step": 4, "score": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{log} line 1 is not a log entry"):
        read_log(log)
    (tmp_path / "run.json").write_text('{"method": "lora", "task"')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'run.json'} is not a run record"):
        run.read_spec(tmp_path)


def test_a_near_zero_loss_wandering_tenfold_is_not_a_blow_up(tmp_path):
    """A run that has fitted its data sees its loss move between 1e-5 and 1e-3: large ratios, no divergence."""
    from test_train_loop import CONFIG, run

    from deltactl.train import loop

    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = model(**batch).loss
        scale = 1e-3 if calls["n"] % 4 == 0 else 1e-5  # every fourth step 100× the others, all tiny
        return loss * scale / loss.detach()

    outcome, _ = run(tmp_path, CONFIG, loss_fn=loss_fn)
    assert outcome.status == "finished" and outcome.steps == 13
    assert loop._blown(20.0, 1.0) and not loop._blown(1e-3, 1e-5) and not loop._blown(0.9, 0.05)
    assert not loop._blown(5.0, 3.0)  # more than a nat up, but not tenfold: noise of a loss near 3
