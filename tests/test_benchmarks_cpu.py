"""Every benchmark script in ``benchmarks/`` runs its main on the smallest shape with minimal steps, on one CPU thread,
so that the scripts cannot rot between the runs that measure (GPU runs included: the CUDA branches share the code
paths run here, less the synchronisation and the CUDA memory counters). ``gpu_check.py`` has its own test
(``tests/test_gpu_check.py``). The memory subprocesses of the LoRA and methods benchmarks are checked without
starting them: the worker runs in this process, and its command line parses back to the same settings."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_data

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_T5 = ["--batch", "1", "--source-len", "8", "--target-len", "4", "--steps", "1", "--rounds", "1", "--warmup", "0",
           "--threads", "1", "--device", "cpu"]


def _benchmark(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts set the torch thread count (to 1 here); put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _worker_output(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_timing_helpers_on_a_cpu():
    timing = _benchmark("timing")
    with timing.cuda_peak("cpu", {}) as peak:
        assert timing.seconds(lambda: None, "cpu") >= 0
    assert peak == {"peak_bytes": None, "extra_bytes": None}
    assert timing.mib(None) == "—" and timing.mib(3 * timing.MIB) == "3.0"
    with timing.autocast("cpu", True):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with timing.autocast("cpu", False):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def test_lora_vs_peft(tmp_path, capsys):
    bench = _benchmark("lora_vs_peft")
    out = tmp_path / "lora.json"
    bench.main(["--shapes", "t5-tiny", *TINY_T5, "--no-memory", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "deltactl/PEFT" in printed and "ratio within a round" in printed
    (result,) = json.loads(out.read_text())["results"]
    parity = result["parity"]
    assert parity["max_abs_diff_logits"] == 0 and parity["max_abs_diff_lora_grads"] == 0
    assert parity["loss_deltactl"] != parity["loss_bare_model"]  # the randomised B changes the output
    assert result["step_time"]["paired_ratio"] > 0
    assert result["trainable_params"]["deltactl"] == result["trainable_params"]["peft"]
    # the memory worker (what each subprocess runs), here in this process, under bf16 autocast
    args = bench.parse_args(["--shapes", "t5-tiny", *TINY_T5, "--memory-steps", "1", "--bf16"])
    command = bench.worker_command("peft", "t5-tiny", (1, 8, 4), args)
    worker = bench.parse_args(command[2:])
    assert worker.memory_worker == "peft" and (worker.batch, worker.source_len, worker.target_len) == (1, 8, 4)
    assert (worker.device, worker.bf16, worker.threads, worker.memory_steps) == ("cpu", True, 1, 1)
    bench.main(command[2:])
    measured = _worker_output(capsys)
    assert measured["peak_bytes"] >= 0 and measured["method"]


def test_methods_step(tmp_path, capsys):
    bench = _benchmark("methods_step")
    out = tmp_path / "methods.json"
    assert bench.main(["--shape", "t5-tiny", *TINY_T5, "--sides", "ia3", "--no-memory", "--json", str(out)]) == 0
    assert "vs PEFT" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"lora", "ia3", "peft:ia3"}
    assert rows["lora"]["time_vs_lora"] == 1 and rows["ia3"]["time_vs_peft"] > 0
    args = bench.parse_args(["--shape", "t5-tiny", *TINY_T5, "--memory-steps", "1", "--bf16"])
    command = bench.worker_command("peft:ia3", args)
    worker = bench.parse_args(command[2:])
    assert (worker.memory_worker, worker.shape, worker.device, worker.bf16) == ("peft:ia3", "t5-tiny", "cpu", True)
    assert bench.main(command[2:]) == 0
    measured = _worker_output(capsys)
    assert measured["peak_bytes"] >= 0 and measured["trainable"] > 0


def test_compile_step(capsys):
    torch._dynamo.reset()
    try:
        bench = _benchmark("compile_step")
        result = bench.main(["--backend", "eager", "--batch", "1", "--source", "8", "--target", "4", "--steps", "1",
                             "--rounds", "1", "--device", "cpu", "--bf16"])
    finally:
        torch._dynamo.reset()
    assert result["grad_diff"] < 1e-5 and result["ratio"] > 0 and result["compile_s"] > 0
    assert result["eager_peak_bytes"] is None and result["compiled_peak_bytes"] is None  # CUDA only
    assert "compiled / eager" in capsys.readouterr().out


def test_subspace_fastfood(tmp_path, capsys):
    bench = _benchmark("subspace_fastfood")
    out = tmp_path / "fastfood.json"
    bench.main(["--tiny", "--same-process", "--threads", "1", "--device", "cpu", "--json", str(out)])
    results = json.loads(out.read_text())
    assert set(results["head_to_head"]) == {"D", "fastfood", "fastfood_butterfly", "dense"}
    assert [row["D"] for row in results["growth"]] == [2**12, 2**13]
    said = results["said_t5_tiny"]
    assert 0 < said["projection_share_of_step"] and said["said_peak_bytes"] is None
    assert "dense / fastfood" in capsys.readouterr().out
    # one projection in a fresh process, as sections 1 and 2 measure without --same-process
    fresh = bench.measure("fastfood", 16, 2**10, 1, 1)
    assert fresh["seconds"] > 0 and fresh["peak_mib"] is not None


@needs_data
def test_robust_prefix_latency(capsys):
    bench = _benchmark("robust_prefix_latency")
    result = bench.main(["--batch", "2", "--steps", "1", "--layers", "2", "--repeats", "1", "--threads", "1",
                         "--manifold-examples", "8", "--device", "cpu", "--bf16"])
    assert result["robust_over_plain"] > 0 and result["full_over_plain"] > 0
    assert result["plain_peak_bytes"] is None  # CUDA only
    assert "robust, truncated rollout" in capsys.readouterr().out
