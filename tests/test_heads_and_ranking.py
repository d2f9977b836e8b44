"""How a run turns a model into predictions: T5 rank classification and the encoder's frozen label-word head."""

import pytest
import torch
from conftest import DATA, needs_data
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, T5Config, T5ForConditionalGeneration

import deltactl as dc
from deltactl.tasks import get_task
from deltactl.train import run
from deltactl.train.models import class_log_likelihoods, classifier, text_to_text


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(run.default_model_path())


def tiny_t5(tokenizer):
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
                      num_decoder_layers=1, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=tokenizer.sep_token_id, dropout_rate=0.0, attn_implementation="eager")
    return T5ForConditionalGeneration(config).double().eval()


def tiny_bert(tokenizer):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        num_hidden_layers=2, attn_implementation="eager")
    return BertModel(config).eval()


def test_class_log_likelihood_is_minus_the_token_count_times_the_models_own_loss(tokenizer):
    """Σ_t log p(y_t|y_<t,x) per class, against transformers' mean cross-entropy of each (example, class)."""
    model = tiny_t5(tokenizer)
    inputs = tokenizer(["a fine film", "dull and far too long for what it is"], padding=True, return_tensors="pt")
    words = tokenizer(["negative", "not_entailment"], padding=True, return_tensors="pt")
    targets = words["input_ids"].masked_fill(words["attention_mask"] == 0, -100)
    with torch.no_grad():
        scores = class_log_likelihoods(model, inputs["input_ids"], inputs["attention_mask"], targets)
        for i in range(2):
            for c in range(2):
                row = targets[c][targets[c] != -100].unsqueeze(0)  # the class's own tokens, unpadded
                loss = model(input_ids=inputs["input_ids"][i : i + 1],
                             attention_mask=inputs["attention_mask"][i : i + 1], labels=row).loss
                assert scores[i, c].item() == pytest.approx(-loss.item() * row.shape[1], abs=1e-10)


@needs_data
def test_rank_prediction_always_names_a_class_where_greedy_decoding_names_none(tokenizer):
    task = get_task("sst2", data=DATA, kshot_seed=13)
    model = tiny_t5(tokenizer)
    examples = task.dev[:16]
    with torch.no_grad():
        generated = text_to_text(task, model, tokenizer, 32, predict="generate").evaluate(model, examples, 8)
        ranked = text_to_text(task, model, tokenizer, 32).evaluate(model, examples, 8)
        words = tokenizer(list(task.verbalizer.values()), padding=True, return_tensors="pt")
        targets = words["input_ids"].masked_fill(words["attention_mask"] == 0, -100)
        batch = tokenizer([task.source_text(e) for e in examples], padding=True, return_tensors="pt")
        best = class_log_likelihoods(model, batch["input_ids"], batch["attention_mask"], targets).argmax(-1)
    assert generated["accuracy"] == 0.0  # a random T5 never writes "negative" or "positive"
    truth = torch.tensor([task.label_index(e) for e in examples])
    assert ranked["accuracy"] == pytest.approx((best == truth).double().mean().item())


@needs_data
def test_label_word_head_trains_nothing_but_delta_and_carries_to_another_task(tokenizer, tmp_path):
    folder = tmp_path / "bert"
    tiny_bert(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    spec = run.resolve("lora", "sst2", {"epochs": 1.0, "batch_size": 8, "eval_every": 2, "lr": 1e-2},
                       model=str(folder), kshot_seed=13, max_length=32, head="label_words")
    task, task_model, delta = run.build(spec, DATA)
    labels_before = task_model.model.labels.clone()
    trained = run.trainable_parameters(task_model)
    assert task_model.head == [] and trained and all(n.startswith("bert.deltactl.lora.") for n in trained)
    assert sum(p.numel() for p in trained.values()) == sum(p.numel() for p in delta.parameters())
    outcome = run.train(spec, tmp_path / "run", data=DATA)
    assert outcome.status == "finished"
    assert torch.equal(task_model.model.labels, labels_before)
    # the δ trained on sst2 is read by rte's head (its own label words): every tensor it needs is there
    rte = run.resolve("lora", "rte", {"batch_size": 8}, model=str(folder), kshot_seed=13, max_length=32,
                      head="label_words")
    _, rte_model, _ = run.build(rte, DATA)
    saved = load_file(str(tmp_path / "run" / "best" / "trainable.safetensors"))
    assert set(saved) == set(run.trainable_parameters(rte_model))


def test_label_word_head_refuses_regression_and_unknown_heads(tokenizer):
    encoder = tiny_bert(tokenizer)

    class Stsb:
        name, is_regression, labels = "stsb", True, ()

    with pytest.raises(ValueError, match="regression task: it has no label words"):
        classifier(Stsb(), encoder, tokenizer, 32, head="label_words")
    with pytest.raises(ValueError, match="heads: linear, label_words"):
        run.RunSpec("lora", "sst2", head="words")
    with pytest.raises(ValueError, match="modes: rank, generate"):
        run.RunSpec("lora", "sst2", predict="greedy")


@needs_data
def test_heads_and_prediction_modes_refuse_the_wrong_kind_of_model(tokenizer, tmp_path):
    t5 = tmp_path / "t5"
    tiny_t5(tokenizer).float().save_pretrained(t5)
    tokenizer.save_pretrained(t5)
    with pytest.raises(ValueError, match="is for encoders"):
        run.build(run.RunSpec("lora", "sst2", model=str(t5), kshot_seed=13, head="label_words"), DATA)
    with pytest.raises(ValueError, match="is for text-to-text models"):
        run.build(run.RunSpec("lora", "sst2", kshot_seed=13, predict="generate"), DATA)


def test_label_word_head_is_a_zero_shot_classifier_with_no_parameters(tokenizer):
    model = classifier(get_task_stub(), tiny_bert(tokenizer), tokenizer, 32, head="label_words")
    assert model.head == [] and not [n for n, _ in model.model.named_parameters() if not n.startswith("bert.")]
    dc.attach(model.model.bert, "lora", r=2)  # δ attaches to the encoder inside the head, as with the linear head


def get_task_stub():
    class Binary:
        name, is_regression, labels = "binary", False, ("0", "1")
        verbalizer = {"0": "negative", "1": "positive"}

    return Binary()
