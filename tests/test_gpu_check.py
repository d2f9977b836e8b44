"""The GPU check script (``benchmarks/gpu_check.py``) in its tiny CPU variant, so that its code paths cannot rot
between GPU runs: it runs, prints "no GPU" where there is none, every correctness check (deltactl against PEFT on the
same δ and weights in float32, merged LoRA, generate, SAID) passes, and the JSON and markdown it writes parse and
hold every method. The arithmetic only a GPU run fills (memory ratios) is checked on made-up rows."""

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
METHODS = {"lora", "ia3", "prefix", "prompt", "adapter", "bitfit"}
PEFT_METHODS = {"lora", "ia3", "prefix", "prompt"}


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _load_script()


@pytest.fixture(scope="module")
def tiny_run(gpu_check, tmp_path_factory):
    """One run of the tiny CPU variant: (exit status, printed text, output folder)."""
    out = tmp_path_factory.mktemp("gpu_check")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # (on CPU the script runs on one thread and restores the count)
        status = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out)])
    return status, printed.getvalue(), out


def _table_rows(markdown: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of the markdown table whose first column is ``first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return header, body


def test_tiny_run_exits_zero_and_says_no_gpu(tiny_run):
    status, printed, _ = tiny_run
    assert status == 0, printed
    if not torch.cuda.is_available():
        assert "no GPU" in printed
    assert "All correctness checks: OK" in printed


def test_every_check_passes_within_float32_tolerance(tiny_run):
    _, _, out = tiny_run
    result = json.loads((out / "gpu_check_tiny.json").read_text())
    assert result["all_checks_ok"] is True
    checks = {c["method"]: c for c in result["checks"]}
    assert set(checks) == METHODS
    for method, check in checks.items():
        assert check["ok"], check
        assert check["max_abs_diff"] <= check["tol"] <= 1e-3  # float32: 1e-4 × the logits' scale (a few units here)
        if method in PEFT_METHODS:
            assert check["against"].startswith("PEFT")
            assert check["effect"] > 10 * check["tol"]  # the randomised δ changed the output: not a vacuous check
    inference = result["inference"]["checks"]
    assert inference["merged_vs_unmerged"]["ok"] and inference["generate_deltactl_vs_peft"]["ok"]
    assert result["said"]["check"]["ok"]


def test_json_holds_every_side_at_every_batch(tiny_run):
    _, _, out = tiny_run
    result = json.loads((out / "gpu_check_tiny.json").read_text())
    expected = {("deltactl", m) for m in METHODS} | {("peft", m) for m in PEFT_METHODS} | {("ft", "full")}
    for batch in result["settings"]["batches"]["t5-tiny"]:
        rows = [r for r in result["training"] if r["batch"] == batch]
        assert {(r["side"], r["method"]) for r in rows} == expected
        for r in rows:
            assert r["ms_per_step"] > 0 and r["trainable"] > 0
            assert r["peak_mib"] is None  # no CUDA: no peak counter
            assert (r["time_vs_peft"] is not None) == (r["side"] == "deltactl" and r["method"] in PEFT_METHODS)
    assert {(r["side"], r["method"]) for r in result["memory_batch1"]} == expected - {("ft", "full")}
    assert result["inference"]["merged_over_base"] > 0 and result["said"]["projection_share"] > 0


def test_markdown_tables_parse_and_hold_every_method(tiny_run):
    _, printed, out = tiny_run
    markdown = (out / "gpu_check_tiny.md").read_text()
    assert markdown in printed  # what is printed is what is written
    header, body = _table_rows(markdown, "shape")
    assert all(len(row) == len(header) for row in body)
    assert {row[header.index("method")] for row in body} == METHODS | {"full"}
    checked = [row for row in body if row[header.index("side")] == "deltactl"]
    assert all(row[-1].startswith("OK ") for row in checked)
    for first in ("method", "latency", "D"):  # memory saved, inference and SAID tables
        header, body = _table_rows(markdown, first)
        assert body and all(len(row) == len(header) for row in body)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left by the atomic writes


def test_ratios_on_made_up_gpu_numbers(gpu_check):
    """The memory ratios and the batch-1 memory saved, which only a GPU run fills, on made-up numbers."""
    rows = [
        {"shape": "s", "batch": 1, "side": "ft", "method": "full", "ms_per_step": 10.0, "peak_mib": 400.0},
        {"shape": "s", "batch": 1, "side": "deltactl", "method": "lora", "ms_per_step": 6.0, "peak_mib": 100.0},
        {"shape": "s", "batch": 1, "side": "peft", "method": "lora", "ms_per_step": 5.0, "peak_mib": 125.0},
        {"shape": "s", "batch": 1, "side": "deltactl", "method": "bitfit", "ms_per_step": 4.0, "peak_mib": 200.0},
    ]
    gpu_check.add_ratios(rows)
    lora = rows[1]
    assert lora["time_vs_peft"] == pytest.approx(1.2) and lora["memory_vs_peft"] == pytest.approx(0.8)
    assert lora["time_vs_ft"] == pytest.approx(0.6) and lora["memory_vs_ft"] == pytest.approx(0.25)
    assert rows[3]["time_vs_peft"] is None and rows[2]["time_vs_peft"] is None  # no PEFT peer / a PEFT row itself
    saved = {(r["side"], r["method"]): r["saved_vs_ft"] for r in gpu_check.memory_saved(rows, "s")}
    assert saved == pytest.approx({("deltactl", "lora"): 0.75, ("peft", "lora"): 0.6875, ("deltactl", "bitfit"): 0.5})


def test_atomic_write_replaces_whole_file(gpu_check, tmp_path):
    path = tmp_path / "results" / "x.json"
    gpu_check.write_atomic(path, "old")
    gpu_check.write_atomic(path, "new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
