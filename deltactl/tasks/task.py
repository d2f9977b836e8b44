"""A task definition and a loaded task: its splits, its text-to-text and classifier views, and its metric."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from deltactl.tasks import metrics
from deltactl.tasks.data import Csv, Example, Tsv

STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's files are, how to read them and how to present the task to a model.

    `prompt` is the T5 input with {a} and {b} for the texts; `verbalizer` maps each label string, in label order, to
    its target word ({} for regression); `kshot` is the k-shot file format (None: no k-shot splits);
    `answer_prefix` goes before the word in a T5 target (a template's blank: ``deltactl.tasks.templates``).
    """

    name: str
    hf_name: str
    folder: str
    prompt: str
    verbalizer: Mapping[str, str]
    metrics: tuple[str, ...] = ("accuracy",)
    main_metric: str = "accuracy"
    kshot: Tsv | Csv | None = None
    kshot_files: Mapping[str, str] = field(default_factory=dict)  # split -> file name, where not <split>.<ext>
    topic: bool = False  # a topic/ set: dev and test JSON of {"ori", "label"}, no train file
    answer_prefix: str = ""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.verbalizer)

    @property
    def pair(self) -> bool:
        return "{b}" in self.prompt


class MissingSplitError(KeyError):
    """A split the task's files do not provide; the message says why."""

    def __str__(self) -> str:
        return str(self.args[0])


class Splits(dict):
    """split name -> examples; an absent split raises MissingSplitError with the reason recorded in `absent`."""

    def __init__(self, splits: dict[str, list[Example]], absent: dict[str, str]):
        super().__init__(splits)
        self.absent = absent

    def __missing__(self, split: str):
        reason = self.absent.get(split, f"splits present: {', '.join(self)}")
        raise MissingSplitError(f"no {split!r} split: {reason}")


class Task:
    """A loaded task: `splits` plus how to turn examples into T5 text or class indices and how to score predictions."""

    def __init__(self, spec: TaskSpec, splits: Splits, kshot_seed: int | None = None):
        self.spec, self.splits, self.kshot_seed = spec, splits, kshot_seed
        self.name, self.hf_name, self.main_metric = spec.name, spec.hf_name, spec.main_metric
        self.labels: tuple[str, ...] = spec.labels
        self.verbalizer: dict[str, str] = dict(spec.verbalizer)
        self.is_regression = not self.labels
        self._index = {label: i for i, label in enumerate(self.labels)}
        self._parse = {word.lower(): i for i, word in enumerate(self.verbalizer.values())}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(examples)}" for split, examples in self.splits.items())
        seed = f", kshot_seed={self.kshot_seed}" if self.kshot_seed is not None else ""
        return f"Task({self.name!r}{seed}, {sizes})"

    @property
    def train(self) -> list[Example]:
        return self.splits["train"]

    @property
    def dev(self) -> list[Example]:
        return self.splits["dev"]

    @property
    def test(self) -> list[Example]:
        return self.splits["test"]

    def source_text(self, example: Example) -> str:
        """T5 input in the T5 paper's style, e.g. "rte sentence1: <a> sentence2: <b>"."""
        return self.spec.prompt.format(a=example.text_a, b=example.text_b)

    def target_text(self, example: Example) -> str:
        """The verbalised label; an STS-B score is rounded to the nearest 0.2 and written with one decimal, as in T5."""
        if self.is_regression:
            return f"{round(float(example.label) * 5) / 5:.1f}"
        return self.spec.answer_prefix + self.verbalizer[example.label]

    def class_targets(self) -> list[str]:
        """Every class's target text, in label order (what rank classification scores)."""
        return [self.spec.answer_prefix + word for word in self.verbalizer.values()]

    def label_index(self, example: Example) -> int | float:
        """Class index into `labels` (the score as a float for regression)."""
        if self.is_regression:
            return float(example.label)
        if example.label not in self._index:
            raise ValueError(f"{self.name}: label {example.label!r} is not one of {self.labels}")
        return self._index[example.label]

    def parse_target(self, text: str) -> int | float | None:
        """Inverse of target_text for generated text (case, outer whitespace and the answer prefix ignored); None if
        unparseable."""
        text = text.strip()
        prefix = self.spec.answer_prefix.strip().lower()
        if prefix and text.lower().startswith(prefix):
            text = text[len(prefix):].strip()
        if not self.is_regression:
            return self._parse.get(text.lower())
        try:
            score = float(text)
        except ValueError:
            return None
        return score if math.isfinite(score) else None

    def metric(self, predictions: Sequence[int | float | None], references: Sequence[int | float]) -> dict[str, float]:
        """The task's metrics on label indices (scores for regression); a None prediction counts as wrong.

        For classes None becomes a class other than the reference; for STS-B the end of the 0-5 range farthest from it.
        """
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
        if self.is_regression:
            low, high = STSB_RANGE
            worst = lambda r: low if r >= (low + high) / 2 else high
            pred = [float(worst(r) if p is None else p) for p, r in zip(predictions, references)]
            ref = [float(r) for r in references]
        else:
            k = len(self.labels)
            pred = [(r + 1) % k if p is None else p for p, r in zip(predictions, references)]
            ref = list(references)
        return {name: getattr(metrics, name)(pred, ref) for name in self.spec.metrics}
