"""The combinations study: its subsets, the head-only run, and a sequential stage that trains only its own δ."""

import importlib.util
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deltactl.experiments.finetune import Budget
from deltactl.tasks import data_dir

try:
    DATA = data_dir()
except FileNotFoundError:  # the real data is not on this machine
    DATA = None

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "combinations" / "run.py"
_spec = importlib.util.spec_from_file_location("combinations_study", SCRIPT)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

BUDGET = Budget(steps=1, batch_size=4, eval_every=1, train_examples=4, max_length=16)
SETTING = {"task": "sst2", "kshot_seed": 13, "report_examples": 4}


def test_every_subset_once_empty_first():
    methods = study.simultaneous_methods()
    assert methods[0] == study.HEAD_ONLY and len(methods) == 8
    assert len({frozenset(m.split("+")) for m in methods[1:]}) == 7
    assert [study.label(m) for m in methods] == ["head only", "P", "B", "A", "P+B", "P+A", "B+A", "P+B+A"]


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
def test_head_only_and_sequential_stage_train_what_they_should(tmp_path):
    head = study.train_stage(study.HEAD_ONLY, SETTING, 0, BUDGET, tmp_path / "head", DATA, lr=3e-3)
    assert set(load_file(str(tmp_path / "head" / "best" / "trainable.safetensors"))) == {
        "head.weight", "head.bias"}
    assert head["trainable_parameters"] == 384 * 2 + 2  # MiniLM's 384-wide pooled output → 2 classes

    first = study.train_stage("prompt", SETTING, 0, BUDGET, tmp_path / "p", DATA)
    second = study.train_stage("bitfit", SETTING, 0, BUDGET, tmp_path / "pb", DATA, after=tmp_path / "p")
    stage1 = load_file(str(tmp_path / "p" / "best" / "trainable.safetensors"))
    stage2 = load_file(str(tmp_path / "pb" / "best" / "trainable.safetensors"))
    assert any("prompt" in n for n in stage1)
    assert not any("prompt" in n for n in stage2) and any("bitfit" in n for n in stage2)  # P stays frozen
    assert second["key"]["after"] == first["key"]  # a changed earlier stage invalidates this one
    assert 0.0 <= second["report"] <= 1.0 and second["report_examples"] == 4
    again = study.train_stage("bitfit", SETTING, 0, BUDGET, tmp_path / "pb", DATA, after=tmp_path / "p")
    assert again == second  # a finished run with the same settings is reused
