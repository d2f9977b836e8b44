"""The shared plumbing of the 16-shot protocol studies (deltactl.experiments.kshot)."""

import threading
import time

import pytest
from conftest import DATA, needs_data

from deltactl.experiments import kshot
from deltactl.experiments import protocol as pr


def test_folder_lock_makes_a_second_holder_wait(tmp_path):
    folder = tmp_path / "runs" / "sst2-ft-seed13-lr5e-05"
    order = []

    def second():
        with kshot.folder_lock(folder):
            order.append("second")

    with kshot.folder_lock(folder):
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        order.append("first done")
    waiting.join(5)
    assert order == ["first done", "second"]


def test_only_seeds_narrows_and_names_what_is_wrong():
    cfg = {"seeds": [13, 21, 42, 87, 100]}
    assert kshot.only_seeds(cfg, None) is cfg
    assert kshot.only_seeds(cfg, "42,13")["seeds"] == [13, 42]  # the setting's order
    with pytest.raises(ValueError, match=r"\[7\] not among the setting's seeds"):
        kshot.only_seeds(cfg, "13,7")
    with pytest.raises(ValueError, match="comma-separated list of integers"):
        kshot.only_seeds(cfg, "13;21")


@needs_data
def test_splits_keep_the_report_apart_from_every_file_a_choice_saw():
    fitting, report, dropped = kshot.splits(["sst2", "mr"], [13, 21], DATA, 300)
    assert set(fitting) == {(t, s) for t in ("sst2", "mr") for s in (13, 21)}
    assert {len(e) for e in report.values()} == {300}
    # SST-2 and MR share Rotten Tomatoes sentences: some test sentences occur in a 16-shot file and are dropped
    assert sum(dropped.values()) > 0
    record = kshot.protocol_record(fitting, report, dropped, [13])
    assert record["selection"] == pr.split_keys([e for t in ("sst2", "mr") for e in fitting[(t, 13)]["dev"]])
    seen = {pr.example_key(e) for s in fitting.values() for e in s["train"] + s["dev"]}
    assert not seen & set(record["report"])
    # a rerun draws the same report subset
    assert kshot.splits(["sst2", "mr"], [13, 21], DATA, 300)[1] == report


def test_choose_lr_lets_a_diverged_run_lose_and_refuses_a_grid_that_all_diverged():
    records = {1e-3: {"selection_accuracy": None}, 3e-3: {"selection_accuracy": 0.5}, 1e-2: {"selection_accuracy": 0.5}}
    best, scores = kshot.choose_lr([1e-3, 3e-3, 1e-2], records, "lora, seed 13")
    assert best == 3e-3 and scores == {1e-3: -1.0, 3e-3: 0.5, 1e-2: 0.5}  # ties go to the earlier lr
    with pytest.raises(ValueError, match=r"lora, seed 13: every learning rate of \[0.001\] diverged"):
        kshot.choose_lr([1e-3], records, "lora, seed 13")
