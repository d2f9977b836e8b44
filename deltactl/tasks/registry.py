"""The task definitions, name resolution and get_task, which loads a task's splits from the data folder.

Label ids follow the data's own strings, in the Hugging Face order where that order is known; two differ from their
Hub copies: trec here is 0 description, 1 entity, 2 abbreviation (LM-BFF's order; the Hub's coarse_label puts ABBR
first) and aclImdb here is 0 positive, 1 negative (checked on the text; the Hub's imdb is 0 negative).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from deltactl.tasks.data import Csv, Json, Tsv, data_dir, read
from deltactl.tasks.task import Splits, Task, TaskSpec

KSHOT_SEEDS = (13, 21, 42, 87, 100)

NEG_POS = {"0": "negative", "1": "positive"}
FIVE_STARS = {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}  # LM-BFF's SST-5 words
NLI3 = {"entailment": "entailment", "neutral": "neutral", "contradiction": "contradiction"}
NLI2 = {"entailment": "entailment", "not_entailment": "not_entailment"}
MNLI_HEADER = ("index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label")
SNLI_HEADER = ("index", "captionID", "pairID", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label")
STSB_HEADER = ("index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score")


def _single(name: str, hf_name: str, folder: str, verbalizer: dict, **kw) -> TaskSpec:
    return TaskSpec(name, hf_name, folder, f"{name} sentence: {{a}}", verbalizer, kshot=kw.pop("kshot", Csv()), **kw)


def _topic(name: str, hf_name: str, folder: str, verbalizer: dict) -> TaskSpec:
    return TaskSpec(name, hf_name, folder, f"{name} text: {{a}}", verbalizer, topic=True)


_SPECS = [
    _single("sst2", "glue/sst2", "SST-2", NEG_POS, kshot=Tsv(("sentence", "label"), a=0, b=None, label=1)),
    _single("sst5", "SetFit/sst5", "sst-5", FIVE_STARS),
    _single("cola", "glue/cola", "CoLA", {"0": "unacceptable", "1": "acceptable"}, metrics=("accuracy", "matthews"),
            main_metric="matthews", kshot=Tsv(None, a=3, b=None, label=1, widths=(4,))),  # source, label, *, sentence
    TaskSpec("mnli", "glue/mnli", "MNLI", "mnli hypothesis: {b} premise: {a}", NLI3,
             kshot=Tsv(MNLI_HEADER, a=8, b=9, label=11), kshot_files={"dev": "dev_matched.tsv",
                                                                      "test": "test_matched.tsv"}),
    TaskSpec("mrpc", "glue/mrpc", "MRPC", "mrpc sentence1: {a} sentence2: {b}",
             {"0": "not_equivalent", "1": "equivalent"}, metrics=("accuracy", "f1"), main_metric="f1",
             kshot=Tsv(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), a=3, b=4, label=0)),
    TaskSpec("qnli", "glue/qnli", "QNLI", "qnli question: {a} sentence: {b}", NLI2,
             kshot=Tsv(("index", "question", "sentence", "label"), a=1, b=2, label=3)),
    TaskSpec("qqp", "glue/qqp", "QQP", "qqp question1: {a} question2: {b}", {"0": "not_duplicate", "1": "duplicate"},
             metrics=("accuracy", "f1"), main_metric="f1",
             kshot=Tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"), a=3, b=4, label=5)),
    TaskSpec("rte", "glue/rte", "RTE", "rte sentence1: {a} sentence2: {b}", NLI2,
             kshot=Tsv(("index", "sentence1", "sentence2", "label"), a=1, b=2, label=3)),
    # SNLI rows carry label1 only (11 columns) or label1..label5 (15): gold_label is always the last column.
    TaskSpec("snli", "snli", "SNLI", "snli hypothesis: {b} premise: {a}", NLI3,
             kshot=Tsv(SNLI_HEADER, a=7, b=8, label=-1, widths=(11, 15))),
    TaskSpec("stsb", "glue/stsb", "STS-B", "stsb sentence1: {a} sentence2: {b}", {}, metrics=("pearson", "spearman"),
             main_metric="pearson", kshot=Tsv(STSB_HEADER, a=7, b=8, label=9)),
    _single("cr", "SetFit/SentEval-CR", "cr", NEG_POS),
    _single("mpqa", "jxm/mpqa", "mpqa", NEG_POS),  # a community copy: the Hub has no canonical MPQA polarity set
    _single("mr", "rotten_tomatoes", "mr", NEG_POS),
    _single("subj", "SetFit/subj", "subj", {"0": "subjective", "1": "objective"}),
    # LM-BFF's class order (its template word for 2 is "Expression"); label 2 questions read "What does X stand for?"
    TaskSpec("trec", "trec", "trec", "trec question: {a}", {"0": "description", "1": "entity", "2": "abbreviation",
                                                            "3": "human", "4": "location", "5": "number"}, kshot=Csv()),
    _topic("ag_news", "ag_news", "ag_news", {"0": "world", "1": "sports", "2": "business", "3": "tech"}),
    _topic("imdb", "imdb", "aclImdb", {"0": "positive", "1": "negative"}),
    _topic("amazon_review", "vgaraujov/amazon_review_full", "amazon_review", FIVE_STARS),  # a community copy
    _topic("yahoo_answers", "yahoo_answers_topics", "yahoo_answers", {str(i): word for i, word in enumerate(
        ["society", "science", "health", "education", "computers", "sports", "business", "entertainment", "family",
         "politics"])}),
    _topic("yelp_review", "yelp_review_full", "yelp_review", FIVE_STARS),
]
SPECS = {spec.name: spec for spec in _SPECS}
TASK_NAMES = tuple(SPECS)


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


# Accepted spellings: canonical and data folder names, ignoring case and punctuation ("SST-2", "sts-b", "aclImdb").
_ALIASES = {_key(alias): spec.name for spec in _SPECS for alias in (spec.name, spec.folder)}


def resolve_name(name: str) -> str:
    """The canonical task name for `name`; an unknown name is a ValueError listing the closest valid names."""
    if _key(name) in _ALIASES:
        return _ALIASES[_key(name)]
    close = difflib.get_close_matches(_key(name), list(_ALIASES), n=5, cutoff=0.5)
    suggestions = list(dict.fromkeys(_ALIASES[c] for c in close))[:3]
    hint = f" (closest: {', '.join(suggestions)})" if suggestions else ""
    raise ValueError(f"unknown task {name!r}{hint}; valid names: {', '.join(TASK_NAMES)}")


def get_task(name: str, data: str | os.PathLike | None = None, kshot_seed: int | None = None) -> Task:
    """Load a task: the full train/dev sets (topic sets: dev/test) or, with `kshot_seed`, LM-BFF's 16-shot split."""
    spec = SPECS[resolve_name(name)]
    root = data_dir(data)
    if kshot_seed is None:
        splits = _full_splits(spec, root)
    else:
        splits = _kshot_splits(spec, root, kshot_seed)
    return Task(spec, splits, kshot_seed)


def _full_splits(spec: TaskSpec, root: Path) -> Splits:
    if spec.topic:
        folder, fmt = root / "topic" / spec.folder, Json(a="ori", b=None)
        absent = {"train": f"{spec.name} is a topic set with dev and test files only (no train file)"}
    else:
        folder, fmt = root / "full" / spec.folder, Json(pair=spec.pair)
        absent = {"test": f"the full {spec.name} set has train and dev files only; test sets are in the k-shot "
                          f"folders (kshot_seed in {KSHOT_SEEDS})"}
    names = ("dev", "test") if spec.topic else ("train", "dev")
    return Splits({split: read(folder / f"{split}.json", fmt, spec.labels) for split in names}, absent)


def _kshot_splits(spec: TaskSpec, root: Path, seed: int) -> Splits:
    if spec.kshot is None:
        kshot_tasks = ", ".join(s.name for s in _SPECS if s.kshot)
        raise ValueError(f"{spec.name} has no k-shot splits; k-shot tasks: {kshot_tasks}")
    if seed not in KSHOT_SEEDS:
        raise ValueError(f"kshot_seed must be one of {KSHOT_SEEDS}, got {seed!r}")
    folder = root / "kshot" / spec.folder / f"16-{seed}"
    splits, absent = {}, {}
    for split in ("train", "dev", "test"):
        path = folder / spec.kshot_files.get(split, f"{split}.{spec.kshot.ext}")
        if split == "test" and not path.exists():
            absent[split] = (f"{path} does not exist (the MNLI, QQP and SNLI test files were too large to copy into "
                             f"this data folder); evaluate on the Hugging Face dataset {spec.hf_name} instead")
            continue
        splits[split] = read(path, spec.kshot, spec.labels)
    return Splits(splits, absent)
