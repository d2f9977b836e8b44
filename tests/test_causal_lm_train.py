"""Training a decoder-only LM on a classification task: the loss covers the answer's tokens only, rank prediction
scores each class by its log-likelihood after the source (checked row by row against the unpadded model), and
``deltactl train --model FOLDER`` runs on a GPT-2 checkpoint."""

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import deltactl as dc
from deltactl.tasks import data_dir, get_task
from deltactl.train.models import answer_log_likelihood, causal_lm
from deltactl.train.run import default_model_path

try:
    DATA = str(data_dir())
except FileNotFoundError:
    DATA = None


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 saved as a checkpoint, with MiniLM's WordPiece tokenizer beside it."""
    folder = tmp_path_factory.mktemp("gpt2")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def loaded(folder):
    model = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(folder)


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
@pytest.mark.parametrize("method, options", [("lora", {"r": 2}), ("prompt", {"length": 3})])
def test_class_scores_equal_each_row_scored_alone(gpt2_folder, method, options):
    model, tokenizer = loaded(gpt2_folder)
    delta = dc.attach(model, method, **options)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.3 * torch.randn_like(p))
    task = get_task("sst2", data=DATA, kshot_seed=13)
    examples = task.train[:4]
    task_model = causal_lm(task, model, tokenizer, max_length=64)
    answer = tokenizer(" " + task.class_targets()[1], add_special_tokens=False)["input_ids"]
    batch = task_model.collate(examples)
    assert (batch["labels"] != -100).sum(1).tolist() == [len(tokenizer(" " + task.target_text(e),
                                                                       add_special_tokens=False)["input_ids"])
                                                         for e in examples]
    from deltactl.train.models import _ids

    rows = [_ids(tokenizer, task.source_text(e), special=True) for e in examples]
    with torch.no_grad():
        padded = {k: v for k, v in causal_lm(task, model, tokenizer, 64).collate(examples).items()}
        scored = answer_log_likelihood(model, {**padded, **_with_answer(rows, answer, tokenizer)})
        for i, row in enumerate(rows):  # the reference: one unpadded row, log-probabilities summed by hand
            ids = torch.tensor([row + answer])
            logits = model(input_ids=ids).logits[0, -ids.shape[1]:]
            logp = logits.log_softmax(-1)
            expected = sum(logp[len(row) - 1 + j, tok] for j, tok in enumerate(answer))
            torch.testing.assert_close(scored[i], expected, atol=1e-5, rtol=1e-5)


def _with_answer(rows, answer, tokenizer):
    width = max(len(r) for r in rows) + len(answer)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + answer + [pad] * (width - len(r) - len(answer)) for r in rows]),
        "attention_mask": torch.tensor([[1] * (len(r) + len(answer)) + [0] * (width - len(r) - len(answer))
                                        for r in rows]),
        "labels": torch.tensor([[-100] * len(r) + answer + [-100] * (width - len(r) - len(answer)) for r in rows]),
    }


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
def test_the_loss_is_the_answer_tokens_mean_negative_log_likelihood(gpt2_folder):
    model, tokenizer = loaded(gpt2_folder)
    task = get_task("sst2", data=DATA, kshot_seed=13)
    examples = task.train[:3]
    task_model = causal_lm(task, model, tokenizer, max_length=64)
    batch = task_model.collate(examples)
    with torch.no_grad():
        loss = task_model.loss(model, dict(batch))
        total = -answer_log_likelihood(model, batch).sum()
    torch.testing.assert_close(loss, total / (batch["labels"][:, 1:] != -100).sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DATA is None, reason="the benchmark data folder (../shared/data) is absent")
def test_train_cli_on_a_gpt2_checkpoint(gpt2_folder, tmp_path, monkeypatch):
    from deltactl.cli import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--method", "lora:r=2", "--task", "sst2", "--model", str(gpt2_folder), "--kshot-seed", "13",
            "--data", DATA, "--out", str(out), "--epochs", "0.5", "--batch-size", "8", "--max-length", "48"]
    assert main(argv) == 0
    assert json.loads((out / "run.json").read_text())["inputs"]["base"]["model_type"] == "gpt2"
    assert (out / "best" / "delta" / "delta.safetensors").is_file()
    evaluations = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert 0.0 <= evaluations[-1]["accuracy"] <= 1.0  # rank prediction over sst2's dev split
