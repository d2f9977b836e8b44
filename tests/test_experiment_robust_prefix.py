"""The robust prefix study on the protocol: its splits are disjoint by content (and the report split is the GLUE dev
set less what any seed saw), its claims read robust − plain paired by seed in the stated direction, its cache keys
change with every setting that defines a run, and its committed results follow from their own per-seed runs."""

import json
import random
from copy import deepcopy

import pytest

from deltactl.experiments import protocol as pr
from deltactl.experiments.runner import get_study, load_script
from deltactl.tasks.data import Example

study = load_script("robust_prefix")
CONFIG = json.loads((get_study("robust_prefix").folder / "config.json").read_text())
CFG = {"seeds": [0, 1, 2], "train_examples": 30, "selection_examples": 10, "manifold_examples": 12}


class _Task:
    def __init__(self, train, test=()):
        self.train, self.test = list(train), list(test)


def _fake_data(monkeypatch, train, glue_dev):
    """get_task("sst2") gives ``train``; the k-shot folder's test file (the GLUE dev set) gives ``glue_dev``."""
    import deltactl.tasks

    def get_task(name, data=None, kshot_seed=None):
        assert name == "sst2"
        return _Task(train, glue_dev) if kshot_seed is not None else _Task(train)

    monkeypatch.setattr(deltactl.tasks, "get_task", get_task)


def _pool(n):
    return [Example(f"sentence number {i}", None, str(i % 2)) for i in range(n)]


def test_the_report_split_drops_what_any_seed_trains_selects_or_fits_on(monkeypatch):
    pool = _pool(200)
    # the train file holds half its sentences twice: none may land in two parts of a seed
    train = pool + pool[:100]
    unseen = [Example(f"a dev sentence {i}", None, str(i % 2)) for i in range(20)]
    parts_now = {s: study.seed_parts(pool, s, CFG) for s in CFG["seeds"]}
    # dev sentences equal to a training example of seed 0, a selection example of seed 1, a manifold one of seed 2
    leaked = [parts_now[0]["train"][0], parts_now[1]["selection"][0], parts_now[2]["manifold"][0]]
    _fake_data(monkeypatch, train, unseen + [Example(e.text_a, e.text_b, e.label) for e in leaked])
    parts, report, dropped = study.splits(CFG, None)
    assert dropped == 3 and len(report) == 20  # only the leaked sentences go, all of them
    assert pr.split_keys(report) == pr.split_keys(unseen)
    for p in parts.values():
        keys = {name: set(pr.split_keys(part)) for name, part in p.items()}
        assert [len(p[n]) for n in ("train", "selection", "manifold")] == [30, 10, 12]
        assert len(set(pr.split_keys(p["train"]))) == 30  # no sentence twice within a part either
        assert not keys["train"] & keys["selection"] and not keys["train"] & keys["manifold"]
        assert not keys["selection"] & keys["manifold"]
        assert not set(pr.split_keys(report)) & set().union(*keys.values())
    # each seed is another training subsample
    assert len({tuple(pr.split_keys(p["train"])) for p in parts.values()}) == 3


def _rows(clean, attacked, plain=(0.80, 0.86, 0.91), seeds=(2, 0, 1)):
    """Per-seed rows: the plain prefix's accuracy varies by seed (shared by every condition, attacks 0.3 lower);
    the robust prefix adds ``clean`` on clean sentences and ``attacked`` under each attack. Rows come in an order
    other than the seeds' so a reader that does not pair by seed is caught."""
    rows = []
    for k, seed in enumerate(seeds):
        base = plain[seed]
        accuracy = {}
        for condition in study.CONDITIONS:
            p = base if condition == "clean" else base - 0.3
            shift = clean if condition == "clean" else attacked
            noise = 0.004 * (k - 1)  # a little seed-to-seed variation in the difference
            accuracy[condition] = {"plain": p, "robust": p + shift + noise}
        rows.append({"seed": seed, "accuracy": accuracy})
    return rows


def _verdicts(rows):
    return {v["id"]: v["verdict"] for v in study.verdicts(rows)}


def test_a_robust_prefix_that_helps_under_attack_and_keeps_clean_accuracy_agrees():
    assert _verdicts(_rows(clean=0.0, attacked=0.08)) == dict.fromkeys(("R0", "R1", "R2", "R3", "R4"), "agrees")


def test_a_robust_prefix_that_hurts_disagrees():
    got = _verdicts(_rows(clean=-0.10, attacked=-0.05))
    assert got == dict.fromkeys(("R0", "R1", "R2", "R3", "R4"), "disagrees")


def test_the_difference_is_robust_minus_plain_paired_by_seed():
    rows = _rows(clean=0.01, attacked=0.02)
    for v in study.verdicts(rows):
        # the paired differences are the shift plus the small noise; unpaired (or plain sorted apart from robust)
        # the per-seed plain spread of 0.11 would swamp them
        assert v["a"] == "robust" and v["b"] == "plain"
        assert v["difference"]["mean"] == pytest.approx(0.01 if v["condition"] == "clean" else 0.02, abs=1e-9)
        assert v["difference"]["high"] - v["difference"]["low"] <= 0.0081
        assert v["rule"] == pr.rule_record(next(r for _, _, c, r in study.CLAIMS if c == v["condition"]))
    assert _verdicts(rows)["R0"] == "agrees"  # +0.01 is within ±0.03
    assert _verdicts(_rows(clean=0.05, attacked=0.0))["R0"] == "disagrees"  # a clean gain outside ±0.03 too


def test_a_payload_from_runs_passes_the_protocol_check():
    rows = _rows(clean=0.0, attacked=0.05)
    payload = {"protocol": {"selection": ["a", "b"], "report": ["c"]}, "table": study.table(rows),
               "verdicts": study.verdicts(rows)}
    assert pr.check_results(payload) == []
    cells = {(r["condition"], r["kind"]): r["summary"] for r in payload["table"]}
    assert set(cells) == {(c, k) for c in study.CONDITIONS for k in ("plain", "robust")}
    assert cells[("clean", "plain")]["values"] == [0.80, 0.86, 0.91]  # in seed order


def _part():
    pool = _pool(80)
    return study.seed_parts(pool, 0, CFG)


def test_the_cache_keys_change_with_every_setting_that_defines_a_run(tmp_path):
    cfg = deepcopy(CONFIG["full"])
    part = _part()
    report = _pool(5)
    base = study.train_key(cfg, 0, 1e-4, part)
    assert base == study.train_key(deepcopy(cfg), 0, 1e-4, _part())  # the same run is found again
    other_train = {**part, "train": part["train"][1:] + part["manifold"][:1]}
    changes = [study.train_key(cfg, 1, 1e-4, part), study.train_key(cfg, 0, 3e-4, part),
               study.train_key({**cfg, "train": {**cfg["train"], "patience": 9}}, 0, 1e-4, part),
               study.train_key({**cfg, "train": {**cfg["train"], "max_length": 32}}, 0, 1e-4, part),
               study.train_key({**cfg, "prefix_options": {"length": 5}}, 0, 1e-4, part),
               study.train_key(cfg, 0, 1e-4, other_train),
               study.train_key(cfg, 0, 1e-4, {**part, "selection": part["selection"][:-1]})]
    assert all(k != base for k in changes)
    ev = study.evaluation_key(cfg, 0, 1e-4, part, report)
    ev_changes = [study.evaluation_key({**cfg, "robust": {**cfg["robust"], "steps": 3}}, 0, 1e-4, part, report),
                  study.evaluation_key({**cfg, "attacks": {**cfg["attacks"], "rate": 0.2}}, 0, 1e-4, part, report),
                  study.evaluation_key(cfg, 0, 1e-4, {**part, "manifold": part["manifold"][1:]}, report),
                  study.evaluation_key(cfg, 0, 1e-4, part, report[1:]),
                  study.evaluation_key(cfg, 0, 3e-4, part, report)]
    assert all(k != ev for k in ev_changes)
    # a stored run is reused under its own key only
    folder = study.run_folder(tmp_path, 0, 1e-4)
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"key": base, "selection_accuracy": 0.9}))
    assert study.cached_training(cfg, 0, 1e-4, part, tmp_path)["selection_accuracy"] == 0.9
    assert study.cached_training({**cfg, "train": {**cfg["train"], "patience": 9}}, 0, 1e-4, part, tmp_path) is None


def test_the_seeds_cut_disjoint_parts_of_a_seeded_shuffle():
    pool = _pool(100)
    a, b = study.seed_parts(pool, 0, CFG), study.seed_parts(pool, 0, CFG)
    assert a == b  # deterministic
    shuffled = list(pool)
    random.Random(0).shuffle(shuffled)
    assert a["train"] == shuffled[:30] and a["selection"] == shuffled[30:40] and a["manifold"] == shuffled[40:52]
    with pytest.raises(ValueError):
        study.seed_parts(pool, 0, {**CFG, "train_examples": 90})


def test_the_committed_results_follow_from_their_runs():
    path = get_study("robust_prefix").committed
    results = json.loads(path.read_text())
    if results.get("mode") != "full" or "verdicts" not in results:
        pytest.skip("the committed results predate the protocol")
    assert pr.check_results(results) == []
    assert results["seeds"] == sorted(r["seed"] for r in results["runs"]) and len(results["seeds"]) >= 3
    assert study.table(results["runs"]) == results["table"]
    assert study.verdicts(results["runs"]) == results["verdicts"]
    total = sum(r["seconds"]["training"] + r["seconds"]["evaluation"] for r in results["runs"])
    assert results["compute_seconds"] == pytest.approx(total, abs=0.2)
    fitted = set(results["protocol"]["fitted"]) | set(results["protocol"]["selection"])
    assert not fitted & set(results["protocol"]["report"])
    for run in results["runs"]:  # the chosen lr is the grid value with the best selection score (ties to first)
        scores = run["selection_scores"]
        assert scores[f"{run['lr']:g}"] == max(scores.values())
