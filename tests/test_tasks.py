"""deltactl.tasks: the real data loads with the documented sizes, malformed files fail loudly, the metrics are right."""

import math
from collections import Counter
from functools import cache

import pytest

from deltactl.tasks import KSHOT_SEEDS, TASK_NAMES, Example, MissingSplitError, Task, data_dir, get_task, metrics
from deltactl.tasks.registry import SPECS, resolve_name
from deltactl.tasks.task import Splits


def _found_data():
    try:
        return data_dir()
    except FileNotFoundError:
        return None


needs_data = pytest.mark.skipif(
    _found_data() is None, reason="benchmark data folder not found (../shared/data or $DELTACTL_DATA)"
)


@cache
def load(name, seed=None):
    return get_task(name, kshot_seed=seed)


def bare(name):
    """A task without data, for its text and metric behaviour."""
    return Task(SPECS[name], Splits({}, {}))


# Full train/dev sizes (README: SST-2 6,227/692, RTE 2,240/249, MNLI 8,999/1,000; the rest counted from the files).
FULL = {
    "sst2": (6227, 692), "sst5": (7689, 855), "cola": (7695, 856), "mnli": (8999, 1000), "mrpc": (3300, 367),
    "qnli": (8999, 1000), "qqp": (8999, 1000), "rte": (2240, 249), "snli": (8999, 1000), "stsb": (5173, 575),
    "cr": (1597, 178), "mpqa": (7742, 861), "mr": (7795, 867), "subj": (7200, 800), "trec": (4906, 546),
}
TOPIC = {"ag_news": 4, "imdb": 2, "amazon_review": 5, "yahoo_answers": 10, "yelp_review": 5}
# k-shot test sizes (each task's GLUE/original dev set); None: the file is absent from this copy.
KSHOT_TEST = {
    "sst2": 872, "sst5": 2210, "cola": 1043, "mnli": None, "mrpc": 408, "qnli": 5463, "qqp": None, "rte": 277,
    "snli": None, "stsb": 1500, "cr": 2000, "mpqa": 2000, "mr": 2000, "subj": 2000, "trec": 500,
}


def test_registry_names():
    assert TASK_NAMES == (*FULL, *TOPIC)
    for name in TASK_NAMES:
        task = bare(name)
        assert task.hf_name and task.labels == tuple(task.verbalizer)
        assert len(set(task.verbalizer.values())) == len(task.labels)  # parse_target needs distinct words
    assert bare("stsb").is_regression and bare("stsb").labels == ()
    assert bare("mrpc").main_metric == "f1" and bare("cola").main_metric == "matthews"
    assert bare("stsb").main_metric == "pearson" and bare("trec").main_metric == "accuracy"


@pytest.mark.parametrize("alias, name", [
    ("sst2", "sst2"), ("SST-2", "sst2"), ("sst-2", "sst2"), ("sts-b", "stsb"), ("STS-B", "stsb"), ("sst-5", "sst5"),
    ("aclImdb", "imdb"), ("IMDB", "imdb"), ("AG-News", "ag_news"), ("CoLA", "cola"), ("Yelp_Review", "yelp_review"),
])
def test_aliases(alias, name):
    assert resolve_name(alias) == name


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"unknown task 'sst3' \(closest: .*sst2.*\); valid names: sst2, sst5"):
        get_task("sst3")
    with pytest.raises(ValueError, match=r"closest: yelp_review"):
        get_task("yelp")


@needs_data
@pytest.mark.parametrize("name", FULL)
def test_full_sets(name):
    task = load(name)
    assert (len(task.train), len(task.dev)) == FULL[name]
    assert set(task.splits) == {"train", "dev"}
    for ex in task.train + task.dev:
        index = task.label_index(ex)  # raises for a label outside task.labels
        assert (ex.text_b is not None) == SPECS[name].pair
        if not task.is_regression:
            assert task.labels[index] == ex.label
    assert task.dev[0].text_a in task.source_text(task.dev[0])
    with pytest.raises(MissingSplitError, match="k-shot"):
        task.splits["test"]


@needs_data
@pytest.mark.parametrize("name", TOPIC)
def test_topic_sets(name):
    task = load(name)
    assert {split: len(examples) for split, examples in task.splits.items()} == {"dev": 1000, "test": 1000}
    for split in ("dev", "test"):
        assert Counter(ex.label for ex in task.splits[split]).keys() == set(task.labels)
        assert len(task.labels) == TOPIC[name]
    with pytest.raises(MissingSplitError, match="no train file"):
        _ = task.train
    with pytest.raises(ValueError, match="no k-shot splits"):
        get_task(name, kshot_seed=13)


@needs_data
@pytest.mark.parametrize("name", KSHOT_TEST)
def test_kshot_seed_13(name):
    task = load(name, 13)
    for split in ("train", "dev"):
        examples = task.splits[split]
        if task.is_regression:  # LM-BFF samples STS-B as two classes: scores below 2.5 and from 2.5 up
            assert Counter(float(ex.label) >= 2.5 for ex in examples) == {False: 16, True: 16}
        else:
            assert Counter(ex.label for ex in examples) == {label: 16 for label in task.labels}
    if KSHOT_TEST[name] is None:
        assert set(task.splits) == {"train", "dev"}
        with pytest.raises(MissingSplitError, match="too large to copy"):
            _ = task.test
    else:
        assert len(task.test) == KSHOT_TEST[name]
        for ex in task.test:
            task.label_index(ex)


@needs_data
def test_every_kshot_seed_loads():
    for seed in KSHOT_SEEDS:
        for name in KSHOT_TEST:
            classes = 2 if name == "stsb" else len(SPECS[name].labels)
            assert len(load(name, seed).train) == 16 * classes
    with pytest.raises(ValueError, match="kshot_seed must be one of"):
        get_task("sst2", kshot_seed=7)


# First k-shot (seed 13) training example of some tasks, read off the raw files: checks the column mapping.
FIRST_ROWS = {
    "cola": ("Bill seems to be obnoxious, but I don't think that Sam tends.", None, "0"),  # headerless TSV
    "mnli": ("Price caps may sound more attractive with every passing rate case.",
             "Rate cases make price caps sound more attractive.", "entailment"),
    "mrpc": ("The court 's 1992 decision reaffirmed the basic findings of Roe protecting abortion choice but lessened"
             " the standards of protection guaranteed to women by Roe .", None, "1"),
    "qqp": ("Can I develope mobile apps with c++?", "How can I develop mobile apps with C++?", "1"),
    "stsb": ("sheep standing in afield.", "A sheep grazing in a field.", "3.2"),
    "sst2": ("nothing happens , and it happens to flat characters .", None, "0"),
    "trec": ("What 2th-century American poet wrote a four-volume biography of Abraham Lincoln ?", None, "3"),
}


@needs_data
@pytest.mark.parametrize("name", FIRST_ROWS)
def test_kshot_columns(name):
    ex = load(name, 13).train[0]
    text_a, text_b, label = FIRST_ROWS[name]
    assert (ex.text_a, ex.label) == (text_a, label)
    if text_b is not None:
        assert ex.text_b == text_b


@needs_data
def test_kshot_quirks():
    assert load("cr", 13).train[1].text_a.startswith("still , at least from my perspective , a great")  # quoted commas
    assert load("snli", 13).dev[2].label == "entailment"  # a 15-column row whose label1 is "neutral"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_target_round_trip(name):
    task = bare(name)
    for label in task.labels:
        ex = Example("x", None, label)
        word = task.target_text(ex)
        assert task.parse_target(word) == task.parse_target(f"  {word.upper()}\n") == task.label_index(ex)
    assert task.parse_target("no such label") is None


def test_stsb_targets():
    task = bare("stsb")
    targets = {"3.875": "3.8", "1.200": "1.2", "5.000": "5.0", "0": "0.0", "2.3": "2.4", "0.5": "0.4"}  # 0.5: half-even
    for score, text in targets.items():
        assert task.target_text(Example("a", "b", score)) == text
        assert task.parse_target(text) == float(text)
    assert task.label_index(Example("a", "b", "3.875")) == 3.875
    assert task.parse_target("about three") is None and task.parse_target("nan") is None


def test_texts():
    assert bare("sst2").source_text(Example("fine film", None, "1")) == "sst2 sentence: fine film"
    assert bare("rte").source_text(Example("A {x}.", "B.", "entailment")) == "rte sentence1: A {x}. sentence2: B."
    assert bare("mnli").source_text(Example("P.", "H.", "neutral")) == "mnli hypothesis: H. premise: P."
    assert bare("sst2").target_text(Example("x", None, "0")) == "negative"
    assert bare("trec").target_text(Example("x", None, "2")) == "abbreviation"
    assert bare("imdb").target_text(Example("x", None, "0")) == "positive"


def test_metrics_closed_form():
    pred, ref = [1, 1, 0, 0], [1, 0, 0, 0]  # TP 1, FP 1, TN 2, FN 0
    assert metrics.accuracy(pred, ref) == 0.75
    assert metrics.f1(pred, ref) == pytest.approx(2 / 3)
    assert metrics.matthews(pred, ref) == pytest.approx(1 / math.sqrt(3))  # (1·2 − 1·0) / √(2·1·3·2)
    assert metrics.matthews([0, 1, 0], [1, 0, 1]) == pytest.approx(-1)
    assert metrics.matthews([1, 1, 1], [1, 0, 1]) == 0.0  # constant prediction
    assert metrics.matthews([0, 1, 2], [0, 1, 2]) == pytest.approx(1)
    assert metrics.f1([0, 0], [0, 0]) == 0.0
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(math.sqrt(27 / 28))  # cov 3, var 2 and 14/3
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert metrics.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 − 6·2 / (4·15)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))  # tied ranks 2.5, 2.5
    assert metrics.spearman([1, 5, 9], [0.1, 20, 300]) == pytest.approx(1)
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])


def test_task_metric_counts_none_as_wrong():
    assert bare("sst2").metric([1, None, 0], [1, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    # MRPC: None on a positive is a false negative, on a negative a false positive: TP 1, FN 1, FP 1.
    assert bare("mrpc").metric([1, None, 0, None], [1, 1, 0, 0]) == {"accuracy": 0.5, "f1": 0.5}
    assert bare("cola").metric([1, 1, 0, 0], [1, 0, 0, 0])["matthews"] == pytest.approx(1 / math.sqrt(3))
    assert bare("trec").metric([None, 5], [5, 5]) == {"accuracy": 0.5}
    got = bare("stsb").metric([None, 4.0, 1.0, None], [0.2, 4.0, 1.5, 4.8])
    assert got == {"pearson": pytest.approx(metrics.pearson([5, 4, 1, 0], [0.2, 4, 1.5, 4.8])),
                   "spearman": pytest.approx(metrics.spearman([5, 4, 1, 0], [0.2, 4, 1.5, 4.8]))}
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        bare("sst2").metric([1, 0], [1, 0, 1])


def test_data_dir_resolution(tmp_path, monkeypatch):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    monkeypatch.delenv("DELTACTL_DATA", raising=False)
    assert data_dir(tmp_path) == tmp_path.resolve()
    monkeypatch.chdir(tmp_path / "work")
    assert data_dir() == (tmp_path / "shared" / "data").resolve()  # ../shared/data from the working directory
    monkeypatch.setenv("DELTACTL_DATA", str(tmp_path / "work"))
    assert data_dir() == (tmp_path / "work").resolve()
    monkeypatch.setenv("DELTACTL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data_dir()


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "no-data"
    with pytest.raises(FileNotFoundError) as err:
        get_task("sst2", data=missing)
    message = str(err.value)
    for part in (str(missing), "--data", "DELTACTL_DATA", "Hugging Face", "hf_name"):
        assert part in message
    with pytest.raises(FileNotFoundError, match=r"full/SST-2/train\.json not found"):
        get_task("sst2", data=tmp_path)  # the folder exists but lacks the task's files


def _write(root, relative, text):
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


GOOD_JSON = '{"0": {"text_a": "fine", "text_b": null, "label": "1"}}'


@pytest.mark.parametrize("train, message", [
    ('{"0": {"text_a": "fine", "text_b": null, "label": "1"},', "not valid JSON"),
    ('{"0": {"text_a": "fine", "text_b": null, "label": "1"}, "1": {"text_a": "x", "label": "0"}}',
     r"key '1': expected fields \['label', 'text_a', 'text_b'\]"),
    ('{"7": {"text_a": "fine", "text_b": null, "label": "2"}}', r"key '7': label '2' is not one of \('0', '1'\)"),
    ('{"0": {"text_a": "fine", "text_b": "extra", "label": "1"}}', r"key '0': expected one text"),
    ('[["fine", "1"]]', "expected a JSON object"),
])
def test_malformed_json(tmp_path, train, message):
    _write(tmp_path, "full/SST-2/dev.json", GOOD_JSON)
    path = _write(tmp_path, "full/SST-2/train.json", train)
    with pytest.raises(ValueError, match=message) as err:
        get_task("sst2", data=tmp_path)
    assert str(path) in str(err.value)


def test_json_int_labels_and_pairs(tmp_path):
    _write(tmp_path, "full/trec/train.json", '{"0": {"text_a": "Who?", "text_b": null, "label": 3}}')
    _write(tmp_path, "full/trec/dev.json", '{"0": {"text_a": "Why?", "text_b": null, "label": 0}}')
    assert get_task("trec", data=tmp_path).train == [Example("Who?", None, "3")]
    _write(tmp_path, "full/RTE/train.json", '{"0": {"text_a": "A.", "text_b": null, "label": "entailment"}}')
    with pytest.raises(ValueError, match=r"RTE/train\.json: key '0': expected two texts"):
        get_task("rte", data=tmp_path)


def test_malformed_tsv(tmp_path):
    folder = "kshot/SST-2/16-13"
    _write(tmp_path, f"{folder}/dev.tsv", "sentence\tlabel\ngood\t1\n")
    train = _write(tmp_path, f"{folder}/train.tsv", "sentence\tlabel\ngood\t1\nno tab here\nbad\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv: line 3: expected 2 tab-separated columns, found 1") as err:
        get_task("sst2", data=tmp_path, kshot_seed=13)
    assert str(train) in str(err.value)
    _write(tmp_path, f"{folder}/train.tsv", "label\tsentence\n1\tgood\n")
    with pytest.raises(ValueError, match=r"line 1: expected the header \('sentence', 'label'\)"):
        get_task("sst2", data=tmp_path, kshot_seed=13)
    _write(tmp_path, f"{folder}/train.tsv", "sentence\tlabel\ngood\tpositive\n")
    with pytest.raises(ValueError, match=r"line 2: label 'positive' is not one of"):
        get_task("sst2", data=tmp_path, kshot_seed=13)
    _write(tmp_path, f"{folder}/train.tsv", "sentence\tlabel\ngood\t1\nbad\t0")  # no final newline
    task = get_task("sst2", data=tmp_path, kshot_seed=13)
    assert task.train == [Example("good", None, "1"), Example("bad", None, "0")]
    with pytest.raises(MissingSplitError, match="test.tsv does not exist"):
        _ = task.test


def test_csv(tmp_path):
    folder = "kshot/cr/16-13"
    _write(tmp_path, f"{folder}/train.csv", '1,"great, really"\n0, \n')
    _write(tmp_path, f"{folder}/dev.csv", "0,meh\n")
    task = get_task("cr", data=tmp_path, kshot_seed=13)
    assert task.train == [Example("great, really", None, "1"), Example(" ", None, "0")]  # kept exactly as written
    _write(tmp_path, f"{folder}/dev.csv", "0,meh\n1,fine,\n")
    with pytest.raises(ValueError, match=r"dev\.csv: line 2: expected 2 fields"):
        get_task("cr", data=tmp_path, kshot_seed=13)
