"""Whole runs: a local T5 checkpoint trains text-to-text end to end; kill and rerun resumes; eval; bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DATA, needs_data

from deltactl.train import run


def spec(method, model=None, **train):
    settings = {"epochs": 1.0, "batch_size": 8, "eval_every": 2, "lr": 1e-2, **train}
    return run.resolve(method, "sst2", settings, model=model and str(model), kshot_seed=13, max_length=32)


@needs_data
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ft"])
def test_t5_checkpoint_trains_text_to_text(t5_folder, tmp_path, method):
    outcome = run.train(spec(method, t5_folder), tmp_path / "run", data=DATA)
    assert outcome.status == "finished" and outcome.steps == 4  # 32 examples, batch 8
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4] and all(0.0 <= e["accuracy"] <= 1.0 for e in log)
    metrics = run.evaluate_run(tmp_path / "run", "dev", data=DATA)
    assert metrics["accuracy"] == outcome.best_metric  # the kept δ is the best evaluation's
    if method != "ft":
        assert (tmp_path / "run" / "best" / "delta" / "delta.json").exists()


@needs_data
def test_rerun_with_other_settings_is_refused(t5_folder, tmp_path):
    run.train(spec("lora", t5_folder, epochs=0.25), tmp_path / "run", data=DATA)
    with pytest.raises(ValueError, match="holds a run with other settings"):
        run.train(spec("lora", t5_folder, lr=0.5), tmp_path / "run", data=DATA)


def _train_command(out, folder, stop_after=None):
    argv = [sys.executable, "-m", "deltactl.cli", "train", "--method", "lora:r=4", "--task", "sst2",
            "--kshot-seed", "13", "--model", str(folder), "--out", str(out), "--epochs", "3", "--batch-size", "4",
            "--eval-every", "3", "--lr", "0.01", "--max-length", "32", "--data", str(DATA)]
    return argv + (["--stop-after", str(stop_after)] if stop_after else [])


@needs_data
def test_killed_run_resumes_to_the_same_delta(t5_folder, tmp_path):
    """Kill -9 the training process after its first checkpoint, rerun the same command: same δ as one run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(_train_command(tmp_path / "whole", t5_folder), env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:]
    process = subprocess.Popen(_train_command(tmp_path / "killed", t5_folder), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint" / "state.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    progress = json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["progress"]
    assert progress["step"] < 24  # it was killed before the end
    resumed = subprocess.run(_train_command(tmp_path / "killed", t5_folder), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step" in resumed.stdout
    from safetensors.torch import load_file

    whole = load_file(str(tmp_path / "whole" / "checkpoint" / "state.safetensors"))
    again = load_file(str(tmp_path / "killed" / "checkpoint" / "state.safetensors"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    assert (Path(tmp_path / "whole" / "log.jsonl").read_text().splitlines()
            == Path(tmp_path / "killed" / "log.jsonl").read_text().splitlines())


def test_missing_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no best δ yet: train it first"):
        run.evaluate_run(tmp_path / "nothing")


def test_run_defaults_and_user_overrides():
    prompt = run.resolve("prompt", "sst2", {"lr": 0.1}, {"init": "random"})
    assert prompt.method_options == {"length": 20, "init": "random"} and prompt.train.lr == 0.1
    assert prompt.train.epochs == run.METHOD_DEFAULTS["prompt"]["epochs"]
    assert run.resolve("prompt", "sst2", method_options={"length": 5}).method_options == {"length": 5}
    with pytest.raises(ValueError, match="ft\\) takes no method options"):
        run.build(run.resolve("ft", "sst2", method_options={"r": 2}), data=DATA)


@needs_data
def test_simultaneous_and_sequential_combinations(t5_folder, tmp_path):
    """prompt+bitfit trains both at once; a later stage (--after) trains only its own δ on top of the frozen ones."""
    both = run.resolve("prompt+bitfit", "sst2", {"epochs": 1.0, "batch_size": 8, "eval_every": 2},
                       method_options={"prompt": {"length": 2}}, model=str(t5_folder), kshot_seed=13, max_length=32)
    assert both.method_options == {"prompt": {"length": 2}, "bitfit": {}}
    assert both.train.lr == min(run.METHOD_DEFAULTS["prompt"]["lr"], run.METHOD_DEFAULTS["bitfit"]["lr"])
    outcome = run.train(both, tmp_path / "stage1", data=DATA)
    assert outcome.status == "finished"
    assert {p.name for p in (tmp_path / "stage1" / "best").iterdir()} >= {"delta-prompt", "delta-bitfit"}

    stage2 = spec("lora", t5_folder)
    stage2 = dataclasses.replace(stage2, after=str(tmp_path / "stage1"))
    _, task_model, deltas = run.build_deltas(stage2, data=DATA)
    trainable = run.trainable_parameters(task_model)
    assert [d.name for d in deltas] == ["lora"] and all(".deltactl.lora." in f".{n}" for n in trainable)
    stored = run.load_file(str(tmp_path / "stage1" / "best" / "trainable.safetensors"))
    params = dict(task_model.model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in stored.items())  # the earlier stage's δ, restored
    assert not any(params[n].requires_grad for n in stored)  # and frozen
    outcome = run.train(stage2, tmp_path / "stage2", data=DATA)
    assert outcome.status == "finished"
    assert run.evaluate_run(tmp_path / "stage2", data=DATA)["accuracy"] == outcome.best_metric
    with pytest.raises(FileNotFoundError, match="no trained stage there"):
        run.build_deltas(dataclasses.replace(stage2, after=str(tmp_path / "nothing")), data=DATA)


@needs_data
def test_readme_eval_line_scores_a_run(t5_folder, tmp_path, monkeypatch, capsys):
    """`deltactl train` with its default run folder, then the README's `deltactl eval --run runs/sst2-lora-seed0`."""
    from deltactl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DELTACTL_DATA", str(DATA))
    assert main(["train", "--method", "lora", "--task", "sst2", "--model", str(t5_folder), "--kshot-seed", "13",
                 "--epochs", "0.25", "--batch-size", "8", "--eval-every", "1", "--max-length", "32"]) == 0
    best = float(capsys.readouterr().out.split("best dev ")[1].split()[0])
    assert (tmp_path / "runs" / "sst2-lora-seed0" / "best").is_dir()
    assert main("eval --run runs/sst2-lora-seed0".split()) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("accuracy=") and float(out.split("accuracy=")[1].split()[0]) == pytest.approx(best, abs=1e-4)


def _copy_inputs(t5_folder, tmp_path):
    """A private copy of the SST-2 16-shot split (seed 13) and of the tiny T5, to change under a run."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(Path(DATA) / "kshot" / "SST-2" / "16-13", data / "kshot" / "SST-2" / "16-13")
    model = tmp_path / "model"
    shutil.copytree(t5_folder, model)
    return data, model


def _change_base(model):
    from transformers import T5ForConditionalGeneration

    base = T5ForConditionalGeneration.from_pretrained(model)
    with torch.no_grad():
        next(base.parameters()).add_(0.01)
    base.save_pretrained(model)


@needs_data
def test_resume_refuses_changed_data_or_base_model_and_fresh_starts_anew(t5_folder, tmp_path, capsys):
    from deltactl.cli import main

    data, model = _copy_inputs(t5_folder, tmp_path)
    out = tmp_path / "run"
    lora = spec("lora", model, epochs=0.25)
    run.train(lora, out, data=data)
    recorded = json.loads((out / "run.json").read_text())["inputs"]
    assert set(recorded["data"]) == {f"kshot/SST-2/16-13/{s}.tsv" for s in ("train", "dev", "test")}
    assert recorded["base"]["model_type"] == "t5" and len(recorded["base"]["sha256"]) == 64

    def disk():
        return sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None)
                      for p in tmp_path.rglob("*") if p.parent != model)

    train_file = data / "kshot" / "SST-2" / "16-13" / "train.tsv"
    original = train_file.read_bytes()
    lines = original.decode().split("\n")
    train_file.write_text("\n".join([lines[0], "a " + lines[1], *lines[2:]]))
    before = disk()
    with pytest.raises(ValueError, match=rf"started on other data: data file {train_file} has changed since the run "
                                         r"began .*run\.json\); rerun with --fresh to start the run anew"):
        run.train(lora, out, data=data)
    assert disk() == before  # nothing written
    train_file.write_bytes(original)
    assert run.train(lora, out, data=data).status == "finished"  # the same data again: it resumes

    _change_base(model)
    before = disk()
    with pytest.raises(ValueError, match=rf"started on another base model: the weights of {model} differ"):
        run.train(lora, out, data=data)
    argv = ["train", "--method", "lora", "--task", "sst2", "--model", str(model), "--kshot-seed", "13",
            "--data", str(data), "--out", str(out), "--epochs", "0.25", "--batch-size", "8", "--eval-every", "2",
            "--lr", "0.01", "--max-length", "32"]
    capsys.readouterr()
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltactl ")]
    assert len(errors) == 1 and "another base model" in errors[0] and "--fresh" in errors[0], errors
    assert disk() == before

    assert main([*argv, "--fresh"]) == 0  # the old run moves aside, whole
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and json.loads((aside[0] / "run.json").read_text())["inputs"] == recorded
    assert (aside[0] / "best").is_dir() and (aside[0] / "log.jsonl").is_file()
    assert f"the earlier run folder is now {aside[0]}" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["inputs"]["base"] != recorded["base"]


@needs_data
def test_a_run_recorded_without_input_hashes_still_resumes(t5_folder, tmp_path):
    data, model = _copy_inputs(t5_folder, tmp_path)
    out = tmp_path / "run"
    lora = spec("lora", model, epochs=0.25)
    run.train(lora, out, data=data)
    record = json.loads((out / "run.json").read_text())
    del record["inputs"]
    (out / "run.json").write_text(json.dumps(record))  # as runs were written before the hashes were recorded
    _change_base(model)
    assert run.train(lora, out, data=data).status == "finished"
    assert "inputs" in json.loads((out / "run.json").read_text())  # recorded from now on


HOLD_LOCK = """import sys, time
from deltactl.train.run import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


@needs_data
def test_a_run_directory_in_use_is_refused_naming_the_pid(t5_folder, tmp_path, capsys):
    """A second process on a run folder whose lock another process holds stops at once and changes nothing."""
    from deltactl.cli import main

    out = tmp_path / "run"
    lora = spec("lora", t5_folder, epochs=0.25)
    run.train(lora, out, data=DATA)

    def disk():
        return sorted((str(p.relative_to(tmp_path)), p.read_bytes() if p.is_file() else None)
                      for p in tmp_path.rglob("*"))

    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = disk()
        in_use = f"run directory {out} is in use by pid {holder.pid}"
        argv = ["train", "--method", "lora", "--task", "sst2", "--model", str(t5_folder), "--kshot-seed", "13",
                "--data", str(DATA), "--out", str(out), "--epochs", "0.25", "--batch-size", "8", "--eval-every", "2",
                "--lr", "0.01", "--max-length", "32"]
        capsys.readouterr()
        for command in (argv, [*argv, "--fresh"], ["eval", "--run", str(out), "--data", str(DATA)]):
            assert main(command) == 2
            errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deltactl ")]
            assert errors == [f"deltactl {command[0]}: {in_use} (another deltactl train or eval); wait for it to "
                              "finish or stop it, then rerun"]
            assert disk() == before
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    assert run.train(lora, out, data=DATA).status == "finished"
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"  # this process held it last
    with run.run_lock(out):  # and released it on return
        with pytest.raises(run.RunInUse, match=f"in use by pid {os.getpid()}"):
            run.evaluate_run(out, data=DATA)
    assert "accuracy" in run.evaluate_run(out, data=DATA)


@needs_data
def test_the_lock_is_held_while_training_new_and_resumed_runs(t5_folder, tmp_path, monkeypatch):
    real_fit, seen = run.fit, []

    def fit_checking_the_lock(*args):
        out = args[-2]
        with pytest.raises(run.RunInUse, match=f"{out} is in use by pid {os.getpid()}"):
            run.RunLock().acquire(out)
        seen.append(out)
        return real_fit(*args)

    monkeypatch.setattr(run, "fit", fit_checking_the_lock)
    lora = spec("lora", t5_folder, epochs=0.25)
    for _ in range(2):  # a new folder (locked once created), then the resume (locked from the start)
        assert run.train(lora, tmp_path / "run", data=DATA).status == "finished"
    assert run.train(lora, tmp_path / "run", data=DATA, fresh=True).status == "finished"  # the new folder's lock
    assert seen == [tmp_path / "run"] * 3
