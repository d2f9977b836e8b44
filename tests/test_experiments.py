"""The experiments framework: study discovery, the subprocess runner, the CLI, the study driver and budgets."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from deltactl.cli import main as cli
from deltactl.experiments import discover, run_study
from deltactl.experiments import study as st
from deltactl.experiments.finetune import Budget, epochs_for, subset, weights_digest

# A study script that records how it was called and fails on request: the runner must pass the flags through.
ECHO = """
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1]) if "--out" in args else Path("results-quick")
out.mkdir(parents=True, exist_ok=True)
(out / "argv.json").write_text(json.dumps({"argv": args, "cwd": os.getcwd()}))
sys.exit(3 if "--fail" in args else 0)
"""


def make_study(root: Path, name: str, script: str = ECHO, config: dict | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or {"description": f"{name} study", "quick": {"n": 1},
                                                               "full": {"n": 2}}))
    (folder / "run.py").write_text(script)
    return folder


def test_discover_finds_folders_with_config_and_script(tmp_path):
    make_study(tmp_path, "beta")
    make_study(tmp_path, "alpha")
    (tmp_path / "notes").mkdir()  # no config, no script: not a study
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")  # no run.py: not a study
    studies = discover(tmp_path)
    assert list(studies) == ["alpha", "beta"]
    assert studies["alpha"].description == "alpha study"
    assert studies["alpha"].script == tmp_path / "alpha" / "run.py"


def test_discover_reports_broken_configs(tmp_path):
    folder = make_study(tmp_path, "broken")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken/config.json is not valid JSON"):
        discover(tmp_path)
    (folder / "config.json").write_text(json.dumps({"description": "x", "quick": {}}))
    with pytest.raises(ValueError, match="lacks full"):
        discover(tmp_path)


def test_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--root"):
        discover(tmp_path / "nowhere")


def test_run_study_passes_flags_in_a_subprocess(tmp_path, monkeypatch):
    make_study(tmp_path, "echo")
    monkeypatch.chdir(tmp_path)
    code = run_study("echo", quick=True, out="rel-out", data="some-data", extra=["--setting", "x"], root=tmp_path)
    assert code == 0
    recorded = json.loads((tmp_path / "rel-out" / "argv.json").read_text())
    # relative paths mean the caller's folder, though the script runs in its own
    assert recorded["argv"] == ["--quick", "--out", str(tmp_path / "rel-out"), "--data", str(tmp_path / "some-data"),
                                "--setting", "x"]
    assert recorded["cwd"] == str(tmp_path / "echo")
    assert run_study("echo", out=tmp_path / "o2", extra=["--fail"], root=tmp_path) == 3
    with pytest.raises(ValueError, match="no study 'nope'.*studies: echo"):
        run_study("nope", root=tmp_path)


def test_cli_list_and_run(tmp_path, capsys):
    make_study(tmp_path, "echo")
    assert cli(["exp", "list", "--root", str(tmp_path)]) == 0
    listing = capsys.readouterr().out
    assert "echo" in listing and "settings: quick, full; no committed results" in listing
    assert cli(["exp", "run", "echo", "--quick", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "argv.json").read_text())["argv"][0] == "--quick"
    with pytest.raises(SystemExit) as failed:  # a failing study keeps its exit status
        cli(["exp", "run", "echo", "--root", str(tmp_path), "--out", str(tmp_path / "o"), "--study-args=--fail"])
    assert failed.value.code == 3
    assert cli(["exp", "run", "nope", "--root", str(tmp_path)]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_study_main_measures_then_replots_from_json(tmp_path, capsys):
    folder = make_study(tmp_path, "demo", config={"description": "d", "quick": {"n": 3}, "full": {"n": 9},
                                                   "reduced": {"n": 5}})
    calls = []

    def measure(cfg, args):
        calls.append(cfg)
        return {"values": list(range(cfg["n"]))}

    def plot(payload, path):
        path.write_text(f"figure of {payload['values']}")

    assert st.main(folder, measure, plot, argv=["--quick"]) == 0
    stored = json.loads((folder / "results-quick" / "results.json").read_text())
    assert stored["config"] == {"n": 3} and stored["mode"] == "quick" and stored["values"] == [0, 1, 2]
    assert stored["wall_seconds"] >= 0 and "torch" in stored["environment"]
    (folder / "results-quick" / "figure.png").unlink()
    st.main(folder, measure, plot, argv=["--quick", "--plot-only"])  # no new measurement, the same figure
    assert len(calls) == 1
    assert (folder / "results-quick" / "figure.png").read_text() == "figure of [0, 1, 2]"
    st.main(folder, measure, plot, argv=["--setting", "reduced", "--out", str(tmp_path / "r")])
    assert json.loads((tmp_path / "r" / "results.json").read_text())["mode"] == "reduced"
    capsys.readouterr()
    for argv, message in (
        (["--setting", "huge"], "demo/run.py: .*has no setting 'huge'; settings: quick, full, reduced"),
        (["--plot-only"], "without --plot-only first"),  # full mode never ran
        (["--quick", "--setting", "full"], "contradict"),
    ):
        assert st.main(folder, measure, plot, argv=argv) == 2
        assert re.search(message, capsys.readouterr().err)
    assert len(calls) == 2


def test_mean_std():
    assert st.mean_std([2.0]) == (2.0, 0.0)
    mean, std = st.mean_std([1.0, 2.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(1.0)
    with pytest.raises(ValueError):
        st.mean_std([])


@pytest.mark.parametrize("n, batch, steps", [(512, 16, 32), (100, 8, 7), (10, 16, 5), (33, 4, 100)])
def test_epochs_for_gives_exactly_the_steps(n, batch, steps):
    import math

    per_epoch = math.ceil(n / batch)
    assert max(1, math.ceil(epochs_for(steps, n, batch) * per_epoch)) == steps  # the loop's own formula


def test_subset_is_deterministic_and_bounded():
    items = list(range(50))
    assert subset(items, 10) == subset(items, 10) and len(set(subset(items, 10))) == 10
    assert subset(items, 10) != items[:10]  # a seeded shuffle, not the file's order
    assert subset(items, None) == items and subset(items, 99) == items
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        Budget(steps=0)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny random BERT saved as a checkpoint with MiniLM's tokenizer: a run in seconds."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from deltactl.train import run

    tokenizer = AutoTokenizer.from_pretrained(run.default_model_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        num_hidden_layers=2, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_run_budgeted_on_real_data(tmp_path, bert_folder):
    from deltactl.experiments.finetune import run_budgeted

    budget = Budget(steps=2, batch_size=4, eval_every=1, train_examples=8, dev_examples=8, max_length=32)
    record = run_budgeted("lora", "sst2", 0, budget, tmp_path / "run", model=bert_folder)
    assert record["outcome"]["steps"] == 2 and [e["step"] for e in record["log"]] == [1, 2]
    # LoRA r=8 on q and v of 2 layers: 4 sites of r·(16 + 16); the head 16·2 + 2
    assert record["trainable_parameters"] == 4 * 8 * 32 + 34
    assert set(record["best"]) == {"train", "dev"} and 0 <= record["best"]["dev"]["accuracy"] <= 1
    assert record["lr"] == 2e-3  # the method's tuned default
    assert not (tmp_path / "run" / "checkpoint").exists()  # only the record is kept
    again = run_budgeted("lora", "sst2", 0, budget, tmp_path / "run", model=bert_folder)  # reused, not retrained
    assert again == record
    other = run_budgeted("lora", "sst2", 1, budget, tmp_path / "run", model=bert_folder)  # other settings: redone
    assert other["seed"] == 1 and other["key"] != record["key"]


def test_efficiency_probe_measures_a_tiny_t5(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "efficiency"))
    try:
        import probe
    finally:
        sys.path.pop(0)
    row = probe.main(["--shape", "t5-tiny", "--method", "lora", "--batch", "2", "--steps", "1",
                      "--source-length", "8", "--target-length", "4"])
    # LoRA r=8 on q and v: 2 encoder layers × 2 sites + 2 decoder layers × (self q, v + cross q, v) = 12 sites,
    # each d_model 16 → heads·d_kv 8: r·(16 + 8) = 192 parameters
    assert row["trainable"] == 12 * 192 and row["parameters"] == 8512 + 12 * 192
    assert row["forward_ms"] > 0 and row["backward_ms"] > 0
    # peak_mib is a growth of this process's peak RSS (ru_maxrss, KiB on Linux): within [0, the whole peak in MiB].
    # A unit slip (bytes or KiB reported as MiB) or a peak not relative to the start breaks the upper bound.
    import resource

    assert 0 <= row["peak_mib"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row


STUDIES = ("performance", "efficiency", "generalisation_gap", "scale", "transferability", "combinations",
           "intrinsic_dimension", "ipt", "robust_prefix")


def test_the_paper_studies_are_discovered_with_all_settings():
    studies = discover()  # the experiments/ folder of this checkout
    for name in STUDIES:
        assert name in studies, f"experiments/{name} is missing"
        assert {"quick", "full"} <= set(studies[name].config), name


def _numbers(obj) -> list[float]:
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _scaled(obj, factor):
    """The JSON with every non-integer number scaled (counts, sizes and seeds, being integers, are kept)."""
    if isinstance(obj, float):
        return obj * factor
    if isinstance(obj, dict):
        return {k: _scaled(v, factor) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scaled(v, factor) for v in obj]
    return obj


def _plotted(fig) -> list[float]:
    """Every finite y value the figure shows: lines (also error bars), bars, scatter points, images."""
    import numpy as np

    values = []
    for ax in fig.axes:
        for line in ax.lines:
            values += np.asarray(line.get_ydata(), dtype=float).ravel().tolist()
        values += [float(p.get_height()) for p in ax.patches if hasattr(p, "get_height")]
        for points in ax.collections:
            offsets = np.asarray(points.get_offsets())
            values += offsets[:, 1].tolist() if offsets.ndim == 2 and len(offsets) else []
        for image in ax.images:
            values += np.asarray(image.get_array(), dtype=float).ravel().tolist()
    return [v for v in values if np.isfinite(v)]


def _replot(study, payload, folder, monkeypatch) -> list[float]:
    import matplotlib.figure

    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(payload))
    spec = importlib.util.spec_from_file_location(f"study_{study.folder.name}", study.script)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # defines measure/plot; main() runs only under __main__
    figures, save = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):  # the figure as saved, so its plotted data can be read back
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)

    def measure(cfg, args):
        raise AssertionError("--plot-only must not measure")

    argv = ["--plot-only", "--out", str(folder)]
    assert st.main(study.folder, measure, script.plot, argv=argv, configure=getattr(script, "configure", None)) == 0
    monkeypatch.undo()
    assert len(figures) == 1 and (folder / "figure.png").stat().st_size > 1000
    return _plotted(figures[0])


@pytest.mark.parametrize("name", STUDIES)
def test_committed_figures_regenerate_from_their_json(name, tmp_path, monkeypatch):
    """The figure shows the committed numbers: its data is largely the JSON's own values, it is the same on a
    replot, and it moves when the JSON's measured values move (a figure of constants or of other data fails)."""
    study = discover()[name]
    if not study.committed.exists():
        pytest.skip(f"experiments/{name}/results/ holds no results.json")
    payload = json.loads(study.committed.read_text())
    shown = _replot(study, payload, tmp_path / "a", monkeypatch)
    assert len(shown) >= 4, f"{name}: the figure plots {len(shown)} values"
    stored = _numbers(payload)
    traced = [v for v in shown if any(abs(v - n) <= 1e-9 * max(1.0, abs(n)) for n in stored)]
    assert len(traced) >= 0.4 * len(shown), f"{name}: only {len(traced)} of {len(shown)} plotted values are in the JSON"
    assert _replot(study, payload, tmp_path / "b", monkeypatch) == shown
    assert _replot(study, _scaled(payload, 1.5), tmp_path / "c", monkeypatch) != shown


def test_weights_digest_follows_the_weights_not_the_folder(tmp_path):
    """A checkpoint re-trained in place gets a new digest, so a study does not reuse runs of the old weights."""
    (tmp_path / "model.safetensors").write_bytes(b"weights one")
    (tmp_path / "config.json").write_text("{}")
    first = weights_digest(tmp_path)
    (tmp_path / "config.json").write_text('{"other": 1}')  # not a weight file
    assert weights_digest(tmp_path) == first
    (tmp_path / "model.safetensors").write_bytes(b"weights two")
    assert weights_digest(tmp_path) != first
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        weights_digest(tmp_path / "empty")


def _script(name):
    spec = importlib.util.spec_from_file_location(f"study_{name}", discover()[name].script)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_transferability_summary_separates_same_type_cross_type_and_zero_shot():
    """Relative performance divides by B's own δ, per seed; gains subtract B's zero-shot metric."""
    script = _script("transferability")
    cfg = {"groups": {"sentiment": ["a", "b"], "nli": ["c"]}, "methods": ["lora"]}
    own = {"a": 0.8, "b": 0.6, "c": 0.5}
    zero = {"a": 0.5, "b": 0.5, "c": 0.5}
    transfer = {("a", "b"): 0.6, ("b", "a"): 0.4, ("a", "c"): 0.25, ("b", "c"): 0.5, ("c", "a"): 0.8,
                ("c", "b"): 0.3}
    cells = [{"method": "lora", "seed": 0, "source": s, "target": t, "value": v} for (s, t), v in transfer.items()]
    cells += [{"method": "lora", "seed": 0, "source": t, "target": t, "value": v} for t, v in own.items()]
    cells += [{"method": "lora", "seed": 0, "source": script.ZERO_SHOT, "target": t, "value": v}
              for t, v in zero.items()]
    matrix = script.relative(cells, cfg)["lora"]
    assert matrix["rows"] == ["a", "b", "c", script.ZERO_SHOT]
    assert matrix["relative"][0] == pytest.approx([1.0, 1.0, 0.5])  # a → (a, b, c): 0.8/0.8, 0.6/0.6, 0.25/0.5
    summary = script.by_type(cells, cfg)["lora"]
    assert summary["same type"]["relative"] == pytest.approx((1.0 + 0.5) / 2)  # a→b 1.0, b→a 0.4/0.8
    assert summary["same type"]["gain_over_zero_shot"] == pytest.approx(((0.6 - 0.5) + (0.4 - 0.5)) / 2)
    assert summary["within sentiment"]["pairs"] == 2
    assert summary["across types"]["pairs"] == 4
    assert summary["across types"]["gain_over_zero_shot"] == pytest.approx((-0.25 + 0.0 + 0.3 - 0.2) / 4)
    assert summary[script.ZERO_SHOT]["gain_over_zero_shot"] == 0


def test_intrinsic_dimension_reports_d90_only_where_fine_tuning_learned():
    script = _script("intrinsic_dimension")
    dims = [10, 100, 1000]
    # zero-shot 0.60, full 0.80: the gain 0.20 is above 2·√(0.25/200) ≈ 0.071; 90 % of it is 0.18
    learned = script.learning(0.60, 0.80, 200, dims, {"DID": [0.61, 0.75, 0.79], "SAID": [0.61, 0.70, 0.75]})
    assert learned == {"learned": True, "gain_d90": {"DID": 1000, "SAID": None}}
    # full 0.65 on 200 examples: a gain of 0.05 is within noise, so no d90 at all
    assert script.learning(0.60, 0.65, 200, dims, {"DID": [0.6, 0.7, 0.7]}) == {"learned": False,
                                                                                "gain_d90": {"DID": None}}
    # the same gain on 2,000 examples is above 2·√(0.25/2000) ≈ 0.022
    assert script.learning(0.60, 0.65, 2000, dims, {"DID": [0.6, 0.7, 0.7]})["gain_d90"] == {"DID": 100}


def test_compute_times_in_the_docs_are_the_results_own():
    """The experiments table and each study page quote compute_seconds as their results.json holds it."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    table = (docs / "experiments.md").read_text()
    checked = 0
    for name, study in discover().items():
        if not study.committed.exists():
            continue
        seconds = json.loads(study.committed.read_text()).get("compute_seconds")
        if seconds is None:
            continue
        row = next((line for line in table.splitlines() if line.startswith(f"| [{name}]")), "")
        quoted = re.findall(r"\| ([\d,]+) s \(\d+ runs\) \|", row)
        page = docs / "experiments" / f"{name}.md"
        quoted += re.findall(r"([\d,]+) s of compute", page.read_text()) if page.exists() else []
        for figure in quoted:
            assert int(figure.replace(",", "")) == round(seconds), f"{name}: docs say {figure} s, results {seconds} s"
            checked += 1
    assert checked >= 3
