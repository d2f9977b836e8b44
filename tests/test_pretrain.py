"""Span-corruption pre-training: the noise mask and corruption against T5's definition, a tiny checkpoint end to end."""

import json

import pytest
import torch

from deltactl.cli import main as cli
from deltactl.train import pretrain as pt


@pytest.mark.parametrize("length", [8, 20, 64, 128, 513])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_mask_follows_t5(length, seed):
    mask = pt.noise_mask(length, torch.Generator().manual_seed(seed))
    noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.dtype == torch.bool and mask.shape == (length,)
    assert int(mask.sum()) == noise  # exactly the noise density, as T5's random_spans_noise_mask
    starts = int((mask[1:] & ~mask[:-1]).sum()) + int(mask[0])
    assert starts == max(round(noise / 3.0), 1)  # the number of spans: noise / mean span length
    assert not mask[0]  # T5 starts with a non-noise span


def test_corruption_is_invertible_and_uses_sentinels_in_order():
    tokens = list(range(1000, 1040))
    sentinels = list(range(1, 101))
    for seed in range(5):
        mask = pt.noise_mask(len(tokens), torch.Generator().manual_seed(seed))
        source, target = pt.corrupt(tokens, mask, sentinels)
        used = [t for t in source if t in sentinels]
        assert used == sentinels[: len(used)] and [t for t in target if t in sentinels] == used
        spans, current = {}, None  # rebuild the text: each sentinel in the source → its span from the target
        for t in target:
            if t in sentinels:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = [u for t in source for u in (spans[t] if t in sentinels else [t])]
        assert rebuilt == tokens
        assert len(source) + len(target) == len(tokens) + 2 * len(used)


def test_collate_wraps_with_special_ids():
    from transformers import AutoTokenizer

    from deltactl.train.run import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    sentinels = pt.sentinel_ids(tokenizer)
    assert sentinels[0] == tokenizer.convert_tokens_to_ids("[unused0]") and len(set(sentinels)) == 100
    chunks = [list(range(2000, 2020)), list(range(3000, 3030))]
    batch = pt.collate(chunks, tokenizer, sentinels, torch.Generator().manual_seed(0))
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.cls_token_id] * 2
    for row, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        kept = row[mask.bool()].tolist()
        assert kept[-1] == tokenizer.sep_token_id  # eos closes the input...
        assert labels[labels != -100].tolist()[-1] == tokenizer.sep_token_id  # ...and the target
        assert labels[0].item() == sentinels[0]


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown pre-training size 'huge'; sizes: tiny, xs, s, m"):
        pt.PretrainConfig(size="huge")
    with pytest.raises(ValueError, match="steps must be at least 1"):
        pt.PretrainConfig(steps=0)
    with pytest.raises(ValueError, match="topic set"):
        pt.corpus(None, tasks=("ag_news",))


def test_tiny_pretraining_gives_an_ordinary_checkpoint(tmp_path, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from deltactl.train import run

    monkeypatch.setenv("DELTACTL_CACHE", str(tmp_path))
    code = cli(["pretrain-t5", "--size", "tiny", "--steps", "4", "--batch-size", "4", "--length", "16",
                "--log-every", "2", "--tasks", "trec", "--max-texts", "200"])
    assert code == 0
    folder = tmp_path / "t5-tiny"  # the default folder, under $DELTACTL_CACHE
    record = json.loads((folder / "pretrain.json").read_text())
    assert [e["step"] for e in record["log"]] == [0, 2, 4]
    assert all(torch.isfinite(torch.tensor(e["held_out_loss"])) for e in record["log"])
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert model.config.d_model == 32 and model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.decoder_start_token_id, model.config.eos_token_id) == (0, 0, 102)
    # the checkpoint trains text-to-text through the ordinary run machinery
    task, task_model, delta = run.build(run.resolve("lora", "sst2", model=str(folder)))
    batch = task_model.collate(task.train[:2])
    assert torch.isfinite(task_model.loss(task_model.model, batch)) and delta.num_parameters() > 0


def test_cli_rejects_bad_pretraining_input(capsys):
    assert cli(["pretrain-t5", "--size", "tiny", "--steps", "0"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
