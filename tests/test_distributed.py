"""`deltactl train` in two processes on CPU (gloo) through ``accelerate launch``: the δ it keeps equals the δ of one
process with the same global batch; only the main process writes; a halted two-process run resumes to the same δ.

The models have no dropout: with dropout each process draws its own masks for its half of the batch, so the runs
agree in distribution only.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, needs_data
from safetensors.torch import load_file

pytestmark = [needs_data, pytest.mark.skipif(sys.platform != "linux", reason="gloo processes are tested on Linux")]

COMMON = ["--task", "sst2", "--kshot-seed", "13", "--batch-size", "8", "--epochs", "2", "--eval-every", "2",
          "--max-length", "32"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny random BERT without dropout, saved with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltactl.train.run import default_model_path

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, processes=2) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``deltactl train`` in ``processes`` CPU processes (no GPU is visible to them)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "DELTACTL_DATA": str(DATA), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "deltactl.cli", "train", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def single(args) -> None:
    from deltactl.cli import main

    assert main(["train", "--data", str(DATA), *args]) == 0


def best_delta(out: Path) -> dict:
    return load_file(str(out / "best" / "trainable.safetensors"))


def last_delta(out: Path) -> dict:
    """δ (and the head) at the run's last step, from its checkpoint."""
    state = load_file(str(out / "checkpoint" / "state.safetensors"))
    return {k.removeprefix("param/"): v for k, v in state.items() if k.startswith("param/")}


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def assert_same_run(one: Path, two: Path):
    """The same δ at the last step (not the best one: a dev example on the decision boundary may flip with float32
    rounding and move the best step), the same losses, dev accuracies within one example."""
    a, b = last_delta(one), last_delta(two)
    assert a.keys() == b.keys()
    for name in a:  # float32 gradients averaged over two halves instead of summed in one batch: rounding only
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4, msg=name)
    first, second = log(one), log(two)
    assert [e["step"] for e in first] == [e["step"] for e in second] == [2, 4, 6, 8]
    for x, y in zip(first, second):
        assert abs(x["accuracy"] - y["accuracy"]) <= 1 / 32 + 1e-9  # 32 dev examples in the 16-shot split
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)  # the global batch's loss, not a half's


def test_two_processes_keep_the_delta_of_one_with_the_same_global_batch(bert_folder, tmp_path, one_thread):
    args = ["--method", "lora:r=4", "--model", str(bert_folder), "--lr", "0.01", *COMMON]
    single([*args, "--out", str(tmp_path / "one")])
    done = launch([*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert done.stdout.count("finished: lora on sst2, 8 steps") == 1  # the main process reports, once
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == [".lock", "best", "checkpoint", "log.jsonl", "outcome.json", "run.json"]
    # δ moved away from LoRA's B = 0, so the agreement is not that of two untrained runs
    assert max(v.abs().max() for k, v in best_delta(tmp_path / "two").items() if k.endswith(".B")) > 1e-3


def test_a_halted_two_process_run_resumes_to_the_same_delta(bert_folder, tmp_path, one_thread):
    args = ["--method", "lora:r=4", "--model", str(bert_folder), "--lr", "0.01", *COMMON]
    single([*args, "--out", str(tmp_path / "one")])
    out = tmp_path / "two"
    halted = launch([*args, "--out", str(out), "--stop-after", "3"])
    assert halted.returncode == 0 and "halted" in halted.stdout, halted.stderr[-3000:]
    state = load_file(str(out / "checkpoint" / "state.safetensors"))
    assert {"rng/torch", "rng/torch/1"} <= state.keys()  # each process's generator is kept
    resumed = launch([*args, "--out", str(out)])
    assert resumed.returncode == 0 and "resuming from step 3 of 8" in resumed.stdout
    assert_same_run(tmp_path / "one", out)


def test_a_text_to_text_t5_with_prefix_rows_trains_in_two_processes(t5_folder, tmp_path):
    """Prefix rows in T5's self- and cross-attention: its MLP's parameters all train, so DDP needs no search for
    unused ones."""
    out = tmp_path / "t5"
    done = launch(["--method", "prefix", "--model", str(t5_folder), "--lr", "0.01", *COMMON, "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert [e["step"] for e in log(out)] == [2, 4, 6, 8]


def test_a_global_batch_that_does_not_split_evenly_is_refused_before_anything_is_written(bert_folder, tmp_path):
    out = tmp_path / "odd"
    args = ["--method", "lora", "--model", str(bert_folder), *COMMON, "--batch-size", "7", "--out", str(out)]
    done = launch(args)
    assert done.returncode != 0  # the launcher reports its processes' exit code 2 as a failure (1)
    assert "--batch-size 7: the global batch is split evenly over the 2 processes, so it must be a multiple of 2" \
        in done.stderr
    assert not out.exists()


def test_bf16_autocast_trains_close_to_float32_but_not_equal(bert_folder, tmp_path, one_thread, capsys):
    """``--mixed-precision bf16`` really computes in bfloat16 (its losses are not float32's) and stays close to it."""
    args = ["--method", "lora:r=4", "--model", str(bert_folder), "--lr", "0.01", *COMMON]
    single([*args, "--out", str(tmp_path / "fp32")])
    single([*args, "--out", str(tmp_path / "bf16"), "--mixed-precision", "bf16"])
    assert "computing under bfloat16 autocast" in capsys.readouterr().out
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["train"]["mixed_precision"] == "bf16"
    for x, y in zip(log(tmp_path / "fp32"), log(tmp_path / "bf16")):
        assert x["train_loss"] != y["train_loss"]  # float32 would give the same losses to the last bit
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=0.05)
    delta = best_delta(tmp_path / "bf16")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in delta.values())


def test_a_launcher_asking_for_float16_autocast_is_refused_naming_where_it_came_from(bert_folder, tmp_path, capsys,
                                                                                      monkeypatch):
    from deltactl.cli import main

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    out = tmp_path / "fp16"
    assert main(["train", "--method", "lora", "--model", str(bert_folder), *COMMON, "--out", str(out)]) == 2
    assert "accelerate asks for mixed precision 'fp16' (ACCELERATE_MIXED_PRECISION" in capsys.readouterr().err
    assert not out.exists()


def test_resuming_with_another_precision_names_the_setting(bert_folder, tmp_path, capsys):
    from deltactl.cli import main

    args = ["train", "--data", str(DATA), "--method", "lora", "--model", str(bert_folder), *COMMON,
            "--out", str(tmp_path / "run"), "--stop-after", "1"]
    assert main(args) == 0
    assert main([*args, "--mixed-precision", "bf16"]) == 2
    assert "train.mixed_precision was 'no', now 'bf16'" in capsys.readouterr().err
