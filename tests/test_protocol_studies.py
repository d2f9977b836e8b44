"""The protocol studies read their claims the way their READMEs state them: which quantity, which direction
(a − b), paired by seed. Synthetic runs with known differences stand in for trained ones."""

import pytest

from deltactl.experiments import protocol as pr
from deltactl.experiments.runner import load_script as _script

SEEDS = (13, 21, 42)


def _runs(offsets: dict, tasks=("sst2", "rte"), **fields):
    """One run per (method, task, seed): report accuracy 0.6 + the method's offset + a per-seed shift that every
    method shares (so a paired difference is exactly the offset difference), other quantities alike."""
    runs = []
    for method, offset in offsets.items():
        for task in tasks:
            for k, seed in enumerate(SEEDS):
                shift = 0.05 * k
                runs.append({"method": method, "task": task, "seed": seed, "report_accuracy": 0.6 + offset + shift,
                             "convergence": 0.5 + offset + shift, "train_accuracy": 0.9 + shift,
                             **{name: value(method) for name, value in fields.items()}})
    return runs


def test_performance_claims_read_a_minus_b_paired_by_seed():
    script = _script("performance")
    offsets = {"ft": 0.0, "prompt": -0.10, "prefix": -0.05, "lora": 0.01, "adapter": -0.02, "bitfit": 0.0,
               "last_layer": -0.04, "selective": 0.02}
    cfg = {"methods": list(offsets), "tasks": ["sst2", "rte"]}
    found = {v["id"]: v for v in script.verdicts(_runs(offsets), cfg)}
    assert found["P1"]["difference"]["mean"] == pytest.approx(0.01)  # LoRA − FT
    assert found["P1"]["verdict"] == "agrees"  # within ±0.03, interval of zero width
    assert found["P3"]["verdict"] == "disagrees"  # prefix 0.05 below FT: outside the margin
    assert found["P5"]["difference"]["mean"] == pytest.approx(0.10) and found["P5"]["verdict"] == "agrees"
    assert found["C4"]["difference"]["mean"] == pytest.approx(-0.01) and found["C4"]["verdict"] == "disagrees"
    assert all(v["difference"]["n"] == len(SEEDS) for v in found.values())


def test_convergence_is_the_mean_best_so_far_over_the_first_evaluations():
    script = _script("performance")
    curve = [{"step": 4, "accuracy": 0.5}, {"step": 8, "accuracy": 0.7}, {"step": 12, "accuracy": 0.6}]
    # best so far: 0.5, 0.7, 0.7, then carried forward to 5 evaluations
    assert script.convergence(curve, {"curve_evals": 5}) == pytest.approx((0.5 + 0.7 * 4) / 5)
    assert script.convergence(curve, {"curve_evals": 2}) == pytest.approx(0.6)


def test_generalisation_gap_claims_are_gap_of_ft_minus_gap_of_the_method():
    gap_study, performance = _script("generalisation_gap"), _script("performance")
    offsets = {"ft": 0.0, "lora": 0.05, "adapter": -0.05, "prefix": 0.0, "prompt": 0.0, "bitfit": 0.0}
    runs = [{**r, "gap": r["train_accuracy"] - r["report_accuracy"]} for r in _runs(offsets)]
    setting = {"methods": list(offsets), "tasks": ["sst2", "rte"]}
    found = {v["id"]: v for v in gap_study.verdicts(runs, setting, performance)}
    # LoRA reports 0.05 higher at the same train accuracy: its gap is 0.05 smaller than FT's
    assert found["G1"]["difference"]["mean"] == pytest.approx(0.05) and found["G1"]["verdict"] == "agrees"
    assert found["G2"]["verdict"] == "disagrees"
    assert found["G0"]["difference"]["mean"] == pytest.approx(0.0)  # the five pooled: +0.05 − 0.05 + 0 + 0 + 0


def test_scale_reads_the_gap_at_the_smallest_depth_minus_the_largest():
    script = _script("scale")
    # FT 0.6 / 0.7 at 2 / 6 blocks; LoRA 0.04 behind at 2 blocks, 0.01 behind at 6: the gap shrinks by 0.03
    accuracy = {(2, "ft"): 0.60, (6, "ft"): 0.70, (2, "lora"): 0.56, (6, "lora"): 0.69}
    runs = [{"depth": d, "method": m, "seed": s, "task": "sst2", "report_accuracy": a + 0.01 * k}
            for (d, m), a in accuracy.items() for k, s in enumerate(SEEDS)]
    found = {v["id"]: v for v in script.verdicts(runs, {"depths": [2, 6], "methods": ["ft", "lora"]})}
    assert found["S0"]["difference"]["mean"] == pytest.approx(0.10)
    assert found["S1"]["difference"]["mean"] == pytest.approx(0.03) and found["S1"]["verdict"] == "agrees"
    assert found["M1"]["difference"]["mean"] == pytest.approx(-0.01) and found["M1"]["verdict"] == "agrees"


def test_every_verdict_of_the_synthetic_studies_passes_the_protocol_check():
    script = _script("performance")
    offsets = {"ft": 0.0, "lora": 0.01}
    cfg = {"methods": list(offsets), "tasks": ["sst2", "rte"]}
    runs = _runs(offsets)
    results = {"protocol": {"selection": ["a"], "report": ["b"]}, "table": script.table(runs, cfg),
               "verdicts": script.verdicts(runs, cfg)}
    assert pr.check_results(results) == []


def test_efficiency_names_the_claims_it_could_not_read_instead_of_dropping_them():
    script = _script("efficiency")
    cfg = {"shapes": ["t5-small"], "batches": [1, 8], "methods": ["ft", "lora"]}
    rows = []
    for repeat in range(3):
        for batch in (1, 8):
            rows.append({"shape": "t5-small", "method": "lora", "batch": batch, "repeat": repeat,
                         "peak_mib": 100.0 * batch, "backward_ms": 5.0 * batch})
            if batch == 8:  # full fine-tuning runs out of memory at the large batch on every repeat
                rows.append({"shape": "t5-small", "method": "ft", "batch": 8, "repeat": repeat, "error": "OOM"})
            else:
                rows.append({"shape": "t5-small", "method": "ft", "batch": 1, "repeat": repeat,
                             "peak_mib": 300.0 + repeat, "backward_ms": 9.0})
    unread = []
    found = script.verdicts(rows, cfg, unread)
    assert [v["id"] for v in found] == ["E1"] and found[0]["verdict"] == "agrees"
    assert [u["id"] for u in unread] == ["E2", "E3"]  # both need FT at batch 8
    assert all("every repeat of one side failed" in u["why"] and "t5-small, LR" in u["claim"] for u in unread)


def test_performance_keeps_an_earlier_results_runs_only_for_the_same_setting(tmp_path):
    import json

    script = _script("performance")
    setting = {"tasks": ["sst2"], "methods": ["ft"], "seeds": [13, 21, 42, 87]}
    runs = [{"method": "ft", "task": "sst2", "seed": s, "report_accuracy": 0.7} for s in (13, 21)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"config": setting, "seeds": [13, 21], "runs": runs, "finished_utc": "then"}))
    kept, provenance = script.kept_runs(str(path), setting, [13, 42, 87])
    assert kept == runs[:1]  # only the seeds asked for; 42 and 87 are trained
    assert provenance["kept_runs"]["seeds"] == [13] and provenance["kept_runs"]["finished_utc"] == "then"
    assert script.kept_runs(None, setting, [13]) == ([], {})
    with pytest.raises(ValueError, match=r"other settings \(methods differ"):
        script.kept_runs(str(path), {**setting, "methods": ["ft", "lora"]}, [13])
    with pytest.raises(ValueError, match="none of \\[42, 87\\]; nothing to keep"):
        script.kept_runs(str(path), setting, [42, 87])
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "protocol": {"selection": ["a"], "report": ["r"]}}))
    same = lambda seeds: {"selection": ["a"], "report": ["r"]}  # noqa: E731
    assert script.kept_runs(str(path), setting, [13], same)[0] == runs[:1]
    with pytest.raises(ValueError, match="its report split differs from the data read now"):
        script.kept_runs(str(path), setting, [13], lambda seeds: {"selection": ["a"], "report": ["other"]})
    path.write_text(json.dumps({**stored, "runs": runs + runs[:1]}))  # seed 13 twice
    with pytest.raises(ValueError, match="one run per task and method"):
        script.kept_runs(str(path), setting, [13, 21])
