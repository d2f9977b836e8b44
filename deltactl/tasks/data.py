"""Finding the benchmark data folder and reading its three file formats into examples.

Readers never drop or alter a row: a malformed file raises ValueError naming the file and the row (or JSON key).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "DELTACTL_DATA"
REPO_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the deltactl package
RELATIVE = Path("..", "shared", "data")


@dataclass(frozen=True)
class Example:
    """One labelled example; `label` is the label string as in the data (an STS-B score stays a string)."""

    text_a: str
    text_b: str | None
    label: str


def cache_root() -> Path:
    """``$DELTACTL_CACHE``, else ``~/.cache/deltactl``: run folders and pre-trained checkpoints, outside the repo."""
    return Path(os.environ.get("DELTACTL_CACHE") or Path.home() / ".cache" / "deltactl")


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data folder: `path`, else $DELTACTL_DATA, else ../shared/data from the cwd, then from the repository root.

    An explicit path or a set DELTACTL_DATA is used as given, with no fallback, so a typo cannot pick other data.
    """
    if path is not None:
        tried = [(Path(path), "the data argument")]
    elif os.environ.get(ENV_VAR):
        tried = [(Path(os.environ[ENV_VAR]), f"${ENV_VAR}")]
    else:
        tried = [(Path.cwd() / RELATIVE, "../shared/data from the working directory"),
                 (REPO_ROOT / RELATIVE, "../shared/data from the repository root")]
    for folder, _ in tried:
        if folder.is_dir():
            return folder.resolve()
    looked = "; ".join(f"{folder} ({how})" for folder, how in tried)
    raise FileNotFoundError(
        f"benchmark data folder not found; looked in: {looked}. Point to it with --data PATH or the {ENV_VAR} "
        "environment variable. Outside this workplace the same tasks are public Hugging Face datasets, named by "
        "each task's hf_name (e.g. glue/sst2, SetFit/sst5, ag_news)."
    )


@dataclass(frozen=True)
class Json:
    """A JSON object {"i": {field: value}}: text fields `a` and `b` (None: the layout has no second text) and "label".

    With `pair` false a present `b` field must be null; every named field is required and no other field is allowed.
    Integer labels (the full cr/mpqa/mr/sst-5/subj/trec files) become their decimal string, as in the k-shot CSVs.
    """

    a: str = "text_a"
    b: str | None = "text_b"
    pair: bool = False

    def rows(self, path: Path) -> Iterator[tuple[str, Example]]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of rows, found {type(data).__name__}")
        fields = {self.a, "label"} | ({self.b} if self.b else set())
        for key, row in data.items():
            where = f"key {key!r}"
            if not isinstance(row, dict) or set(row) != fields:
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}: {where}: expected fields {sorted(fields)}, found {found}")
            a, b, label = row[self.a], row[self.b] if self.b else None, row["label"]
            if not isinstance(a, str) or (self.pair and not isinstance(b, str)) or (not self.pair and b is not None):
                kind = "two texts" if self.pair else "one text (text_b null)"
                raise ValueError(f"{path}: {where}: expected {kind}, found {a!r}, {b!r}")
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise ValueError(f"{path}: {where}: label {label!r} is neither a string nor an integer")
            yield where, Example(a, b, str(label))


@dataclass(frozen=True)
class Tsv:
    """A GLUE TSV (tab-split, no quoting): the expected `header` (None: headerless) and column indices of the fields.

    `widths` lists the allowed columns per row when rows may differ (SNLI rows carry 1 or 5 annotator labels).
    """

    header: tuple[str, ...] | None
    a: int
    b: int | None
    label: int
    widths: tuple[int, ...] = ()
    ext = "tsv"

    def rows(self, path: Path) -> Iterator[tuple[str, Example]]:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
        if lines[-1] == "":
            lines.pop()
        widths = self.widths or (len(self.header),)
        for n, line in enumerate(lines, 1):
            cols = line.removesuffix("\r").split("\t")
            if n == 1 and self.header is not None:
                if tuple(cols) != self.header:
                    raise ValueError(f"{path}: line 1: expected the header {self.header}, found {tuple(cols)}")
                continue
            if len(cols) not in widths:
                expected = " or ".join(map(str, widths))
                raise ValueError(f"{path}: line {n}: expected {expected} tab-separated columns, found {len(cols)}")
            b = cols[self.b] if self.b is not None else None
            yield f"line {n}", Example(cols[self.a], b, cols[self.label])


@dataclass(frozen=True)
class Csv:
    """A headerless `label,sentence` CSV (quoted fields may hold commas)."""

    ext = "csv"

    def rows(self, path: Path) -> Iterator[tuple[str, Example]]:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for row in reader:
                if len(row) != 2:
                    raise ValueError(f"{path}: line {reader.line_num}: expected 2 fields (label,sentence), "
                                     f"found {len(row)}")
                yield f"line {reader.line_num}", Example(row[1], None, row[0])


def read(path: Path, fmt: Json | Tsv | Csv, labels: tuple[str, ...]) -> list[Example]:
    """All examples of one file, each label checked: in `labels`, or a finite number if `labels` is () (regression)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; the data folder looks incomplete (see its README.md and "
                                "SHA256SUMS)")
    examples = []
    for where, ex in fmt.rows(path):
        if not _valid(ex.label, labels):
            allowed = f"one of {labels}" if labels else "a finite number (regression score)"
            raise ValueError(f"{path}: {where}: label {ex.label!r} is not {allowed}")
        examples.append(ex)
    return examples


def _valid(label: str, labels: tuple[str, ...]) -> bool:
    if labels:
        return label in labels
    try:
        return math.isfinite(float(label))
    except ValueError:
        return False
