"""Manual templates: a task's input written as a cloze sentence whose blank a label word fills (LM-BFF).

The templates and label words are LM-BFF's manual ones (Gao, Fisch & Chen, ACL 2021, Table 1), e.g. SST-2
"<S1> It was [MASK] ." with great / terrible. For a text-to-text T5 the blank is its first sentinel, so a
templated example reads exactly like span-corruption pre-training::

    source : a gripping, funny film . It was <extra_id_0> .
    target : <extra_id_0> great

Without a template a T5 sees the T5 paper's task prefix ("sst2 sentence: …") and answers the task's own label
word ("positive"); the paper's combinations study compares the two (Ding et al. 2023, "with and without manual
templates"), which needs a pre-trained T5 (give one with ``--model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from deltactl.tasks.task import Task

MASK = "{mask}"


@dataclass(frozen=True)
class Template:
    """``text`` with ``{a}``, ``{b}`` and ``{mask}``; ``words`` maps each label string to the word for the blank."""

    text: str
    words: Mapping[str, str]


_IT_WAS = "{a} It was {mask} ."
_GREAT = {"0": "terrible", "1": "great"}
_NLI = "{a} ? {mask} , {b}"
_PAIR = "{a} {mask} , {b}"
_YES_NO = {"0": "No", "1": "Yes"}

TEMPLATES: dict[str, Template] = {
    "sst2": Template(_IT_WAS, _GREAT),
    "mr": Template(_IT_WAS, _GREAT),
    "cr": Template(_IT_WAS, _GREAT),
    "mpqa": Template(_IT_WAS, _GREAT),
    "sst5": Template(_IT_WAS, {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}),
    "subj": Template("{a} This is {mask} .", {"0": "subjective", "1": "objective"}),
    "cola": Template("{a} This is {mask} .", {"0": "incorrect", "1": "correct"}),
    # labels here: 0 description, 1 entity, 2 abbreviation, 3 human, 4 location, 5 number
    "trec": Template("{mask} : {a}", {"0": "Description", "1": "Entity", "2": "Expression", "3": "Human",
                                      "4": "Location", "5": "Number"}),
    "mnli": Template(_NLI, {"entailment": "Yes", "neutral": "Maybe", "contradiction": "No"}),
    "snli": Template(_NLI, {"entailment": "Yes", "neutral": "Maybe", "contradiction": "No"}),
    "rte": Template(_NLI, {"entailment": "Yes", "not_entailment": "No"}),
    "qnli": Template(_NLI, {"entailment": "Yes", "not_entailment": "No"}),
    "mrpc": Template(_PAIR, _YES_NO),
    "qqp": Template(_PAIR, _YES_NO),
}


def blank_token(tokenizer) -> str:
    """The token a T5 fills in: ``<extra_id_0>`` (T5's tokenizers), or ``[unused0]`` (the WordPiece checkpoints of
    ``deltactl pretrain-t5``, whose sentinels are the [unused] tokens).

    A WordPiece tokenizer splits "[unused0]" written in text into "[", "unused", "##0", "]"; the token is
    registered here as a special token (its id is unchanged) so that the template's blank stays one token.
    """
    vocabulary = tokenizer.get_vocab()
    for token in ("<extra_id_0>", "[unused0]"):
        if token in vocabulary:
            if token not in tokenizer.all_special_tokens:
                tokenizer.add_special_tokens({"additional_special_tokens": [token]},
                                             replace_extra_special_tokens=False)
            return token
    raise ValueError("the tokenizer has no T5 sentinel (<extra_id_0>) and no [unused0] token to mark the template's "
                     "blank; a manual template needs a model pre-trained to fill blanks")


def templated(task: Task, blank: str) -> Task:
    """``task`` read through its manual template: source = the template with ``blank``, target = blank + word."""
    if task.name not in TEMPLATES:
        raise ValueError(f"{task.name} has no manual template; tasks with one: {', '.join(TEMPLATES)}")
    template = TEMPLATES[task.name]
    if set(template.words) != set(task.labels):
        raise ValueError(f"the {task.name} template's words cover {sorted(template.words)}, not its labels "
                         f"{sorted(task.labels)}")
    words = {label: template.words[label] for label in task.labels}  # in label order
    spec = replace(task.spec, prompt=template.text.replace(MASK, blank), verbalizer=words, answer_prefix=f"{blank} ")
    return Task(spec, task.splits, task.kshot_seed)
