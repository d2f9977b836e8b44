"""The combinations study: its subsets and orders, a sequential stage that starts where its earlier stage ended and
trains only its own δ, and claims read as README.md states them."""

import json

import pytest
import torch
from safetensors.torch import load_file

from deltactl.experiments import kshot
from deltactl.experiments.runner import load_script
from deltactl.tasks import data_dir

try:
    DATA = data_dir()
except FileNotFoundError:  # the real data is not on this machine
    DATA = None

study = load_script("combinations")
SEEDS = (13, 21, 42)
TRAIN = {"batch_size": 8, "eval_every": 2, "patience": 1, "max_epochs": 1, "max_length": 32}


def test_every_non_empty_subset_once_and_every_order():
    parts = ("prompt", "bitfit", "adapter")
    assert [study.label(s) for s in study.subsets(parts)] == ["P", "B", "A", "P+B", "P+A", "B+A", "P+B+A"]
    chains = [c for _, _, c, _ in study.CLAIMS if "→" in c]
    assert len(set(chains)) == 6 and all(sorted(c.split("→")) == ["A", "B", "P"] for c in chains)


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
def test_a_stage_starts_from_its_earlier_stage_and_trains_only_its_own_delta(tmp_path):
    fitting, _, _ = kshot.splits(["sst2"], [13], DATA, 8)
    first = kshot.train_to_plateau("prompt", {"length": 4}, "sst2", 13, 3e-2, TRAIN, fitting, tmp_path / "p", DATA)
    second = kshot.train_to_plateau("bitfit", None, "sst2", 13, 3e-3, TRAIN, fitting, tmp_path / "pb", DATA,
                                    after=tmp_path / "p")
    stage1 = load_file(str(tmp_path / "p" / "best" / "trainable.safetensors"))
    stage2 = load_file(str(tmp_path / "pb" / "best" / "trainable.safetensors"))
    assert stage1 and all("prompt" in n for n in stage1)
    assert stage2 and all("bitfit" in n for n in stage2)  # P stays frozen: the stage saves only its own δ
    # a changed earlier stage gives this stage another key: its settings, or its δ retrained under the same ones
    assert second["key"]["after"]["key"] == first["key"]
    assert second["key"]["after"]["delta"] == kshot.file_digest(tmp_path / "p" / "best" / "trainable.safetensors")

    # before it trains, the stage's model is the earlier stage's chosen model: BitFit starts at zero on top of P
    spec = kshot.spec("bitfit", "sst2", 13, 3e-3, TRAIN, None, after=tmp_path / "p")
    _, task_model, deltas = kshot.run.build_deltas(spec, DATA)
    assert {n for n, p in task_model.model.named_parameters() if p.requires_grad} == {
        n for n in dict(task_model.model.named_parameters()) if "bitfit" in n}
    task_model.model.eval()
    with torch.no_grad():
        start = task_model.evaluate(task_model.model, fitting[("sst2", 13)]["dev"], 64)["accuracy"]
    assert start == first["selection_accuracy"]
    # and the stage's scored model is P's best δ plus its own, not its own alone
    restored = kshot.score_best(spec, tmp_path / "pb", DATA, {"dev": fitting[("sst2", 13)]["dev"]})
    assert restored["dev"] == second["selection_accuracy"]
    assert json.loads((tmp_path / "pb" / "run.json").read_text())["after"] == str(tmp_path / "p")


def _runs(offsets: dict, selection: dict | None = None) -> list[dict]:
    """One run per (method, seed): report 0.6 + offset + a per-seed shift all methods share."""
    runs = []
    for name, offset in offsets.items():
        kind = "sequential" if "→" in name else "simultaneous"
        for k, seed in enumerate(SEEDS):
            runs.append({"method": name, "kind": kind, "parts": name.replace("→", "+").split("+"), "seed": seed,
                         "report_accuracy": 0.6 + offset + 0.05 * k,
                         "selection_accuracy": (selection or {}).get(name, 0.5)})
    return runs


def test_claims_read_a_minus_b_paired_by_seed_and_the_best_single_is_chosen_on_selection():
    offsets = {"P": -0.10, "B": 0.0, "A": 0.02, "P+B": -0.05, "P+A": -0.03, "B+A": 0.04, "P+B+A": 0.01,
               "P→B": -0.04, "P→B→A": 0.0, "P→A": 0.0, "P→A→B": -0.12, "B→P": 0.0, "B→P→A": 0.03, "B→A": 0.0,
               "B→A→P": 0.0, "A→P": 0.0, "A→P→B": 0.02, "A→B": 0.0, "A→B→P": 0.05}
    # B has the best selection accuracy although A reports higher: the best single is B
    runs = _runs(offsets, selection={"P": 0.5, "B": 0.8, "A": 0.7})
    found = {v["id"]: v for v in study.verdicts(runs, {})}
    assert found["K1"]["difference"]["mean"] == pytest.approx(0.04) and found["K1"]["verdict"] == "agrees"
    assert found["K2"]["difference"]["mean"] == pytest.approx(0.02) and found["K2"]["verdict"] == "agrees"
    assert found["K3"]["difference"]["mean"] == pytest.approx(0.01)  # P+B+A − B, not − A
    assert found["K4"]["difference"]["mean"] == pytest.approx(0.03) and found["K4"]["verdict"] == "agrees"
    assert found["Q1"]["claim"].startswith("the chain P→B→A") and found["Q1"]["difference"]["mean"] == \
        pytest.approx(0.10)
    assert found["Q2"]["verdict"] == "disagrees"  # P→A→B ends 0.02 below P
    assert found["Q5"]["difference"]["mean"] == pytest.approx(0.0) and found["Q5"]["verdict"] == "inconclusive"
    assert all(v["difference"]["n"] == len(SEEDS) for v in found.values())
    assert study.reading(list(found.values())) == {"sequential": "agrees", "chains_that_beat_their_first_stage": 3,
                                                   "chains": 6}
    every = [{**v, "verdict": "agrees"} for v in found.values()]
    assert study.reading(every)["sequential"] == "disagrees"  # every order helps: not the paper's finding


def test_table_rows_carry_intervals_over_seeds_and_duplicate_runs_are_refused():
    runs = _runs({"P": 0.0, "B": 0.1, "P→B": 0.05})
    rows = study.table(runs)
    assert [(r["kind"], r["method"]) for r in rows] == [("simultaneous", "P"), ("simultaneous", "B"),
                                                        ("sequential", "P→B")]
    assert rows[1]["summary"]["mean"] == pytest.approx(0.75) and rows[1]["summary"]["n"] == 3
    with pytest.raises(ValueError, match="2 runs of P"):
        study.per_seed(runs + runs[:1], "P")


def test_each_stage_continues_the_previous_stage_at_its_own_methods_chosen_lr(monkeypatch, tmp_path):
    """measure's wiring: stage k of X→Y→Z trains on top of stage k−1's folder, at the lr method k won alone."""
    import types

    won = {"prompt": 0.01, "bitfit": 0.003, "adapter": 0.001}
    calls = []

    def chosen_run(cfg, parts, seed, fitting, report, work, data):
        row = {"method": study.label(parts), "kind": "simultaneous", "parts": list(parts), "seed": seed,
               "lr": won[parts[0]] if len(parts) == 1 else 1e-3, "folder": f"sim-{study.label(parts)}",
               "report_accuracy": 0.7, "selection_accuracy": 0.7, "seconds": 1.0}
        return row

    def stage_run(cfg, order, lr, after, seed, fitting, report, work, data):
        calls.append((study.chain_label(order), lr, str(after)))
        return {"method": study.chain_label(order), "kind": "sequential", "parts": list(order), "seed": seed,
                "lr": lr, "folder": f"seq-{study.chain_label(order)}", "report_accuracy": 0.7,
                "selection_accuracy": 0.7, "seconds": 1.0}

    monkeypatch.setattr(study, "chosen_run", chosen_run)
    monkeypatch.setattr(study, "stage_run", stage_run)
    monkeypatch.setattr(study.kshot, "splits", lambda *a: ({}, {"sst2": []}, {"sst2": 0}))
    monkeypatch.setattr(study.kshot, "protocol_record", lambda *a: {"selection": [], "report": []})
    monkeypatch.setattr(study.runner, "load_script", lambda name: types.SimpleNamespace(zero_shot=lambda *a: 0.5))
    monkeypatch.setenv("DELTACTL_CACHE", str(tmp_path))
    cfg = {"task": "sst2", "parts": ["prompt", "bitfit", "adapter"], "seeds": [13, 21, 42], "report_examples": 8}
    args = types.SimpleNamespace(data=None, seeds=None, quick=False, setting=None)
    study.measure(cfg, args)
    assert len(calls) == 12 * 3
    seed13 = {chain: (lr, after) for chain, lr, after in calls[:12]}
    assert seed13["P→B"] == (won["bitfit"], "sim-P")  # stage 2: on P's chosen run, at B's own lr
    assert seed13["P→B→A"] == (won["adapter"], "seq-P→B")  # stage 3: on stage 2, at A's own lr
    assert seed13["A→P→B"] == (won["bitfit"], "seq-A→P")
    assert set(seed13) == {"P→B", "P→B→A", "P→A", "P→A→B", "B→P", "B→P→A", "B→A", "B→A→P", "A→P", "A→P→B",
                           "A→B", "A→B→P"}
