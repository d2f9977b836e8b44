"""Manual templates (LM-BFF): the cloze text a T5 sees, its targets, and runs that read a task through one."""

import json

import pytest
from conftest import DATA, needs_data
from transformers import AutoTokenizer

from deltactl.tasks import TEMPLATES, templated
from deltactl.tasks.data import Example
from deltactl.tasks.registry import SPECS
from deltactl.tasks.task import Splits, Task
from deltactl.tasks.templates import blank_token
from deltactl.train import run


def bare(name):
    return Task(SPECS[name], Splits({}, {}))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_template_has_one_word_per_label_and_a_blank(name):
    task = templated(bare(name), "<extra_id_0>")
    assert task.labels == bare(name).labels  # the label order is the task's own
    assert len(set(task.verbalizer.values())) == len(task.labels)
    assert "<extra_id_0>" in task.spec.prompt and task.spec.pair == bare(name).spec.pair


def test_templated_text_and_targets_read_like_span_corruption():
    sst2 = templated(bare("sst2"), "<extra_id_0>")
    assert sst2.source_text(Example("a fine film", None, "1")) == "a fine film It was <extra_id_0> ."
    assert sst2.target_text(Example("x", None, "0")) == "<extra_id_0> terrible"
    assert sst2.class_targets() == ["<extra_id_0> terrible", "<extra_id_0> great"]
    # generated text parses with or without the blank in front (a tokenizer may drop it as a special token)
    assert sst2.parse_target("<extra_id_0> great") == sst2.parse_target(" Great ") == 1
    rte = templated(bare("rte"), "[unused0]")
    assert rte.source_text(Example("A cat sat.", "A cat exists.", "entailment")) == \
        "A cat sat. ? [unused0] , A cat exists."
    assert rte.target_text(Example("a", "b", "not_entailment")) == "[unused0] No"
    trec = templated(bare("trec"), "[unused0]")
    assert trec.class_targets()[2] == "[unused0] Expression"  # label 2 is abbreviation (LM-BFF's word)


def test_a_task_without_template_and_a_tokenizer_without_blank_are_refused():
    with pytest.raises(ValueError, match="ag_news has no manual template; tasks with one: sst2"):
        templated(bare("ag_news"), "<extra_id_0>")

    class Plain:
        def get_vocab(self):
            return {"a": 0, "b": 1}

    with pytest.raises(ValueError, match="no T5 sentinel"):
        blank_token(Plain())
    assert blank_token(AutoTokenizer.from_pretrained(run.default_model_path())) == "[unused0]"


@needs_data
def test_a_t5_run_trains_through_the_template(t5_folder, tmp_path):
    spec = run.resolve("lora", "sst2", {"epochs": 1.0, "batch_size": 8, "eval_every": 4, "lr": 1e-2},
                       model=str(t5_folder), kshot_seed=13, max_length=40, template=True)
    task, task_model, _ = run.build(spec, DATA)
    assert task.spec.prompt == "{a} It was [unused0] ." and task.class_targets()[1] == "[unused0] great"
    batch = task_model.collate(task.train[:2])
    tokenizer = AutoTokenizer.from_pretrained(t5_folder)
    assert tokenizer.convert_tokens_to_ids("[unused0]") in batch["input_ids"][0].tolist()
    assert tokenizer.convert_tokens_to_ids("[unused0]") in batch["labels"][0].tolist()
    outcome = run.train(spec, tmp_path / "run", data=DATA)
    assert outcome.status == "finished" and 0.0 <= outcome.best_metric <= 1.0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["template"] is True
    assert run.evaluate_run(tmp_path / "run", data=DATA)["accuracy"] == outcome.best_metric


@needs_data
def test_an_encoder_refuses_a_template():
    with pytest.raises(ValueError, match="template=True is for text-to-text models"):
        run.build(run.RunSpec("lora", "sst2", kshot_seed=13, template=True), DATA)
