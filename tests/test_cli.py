"""The deltactl command: inspect, count, and the errors it prints for bad input."""

import pytest
from conftest import tiny_t5

from deltactl.cli import main


def test_inspect_marks_attached_sites(capsys):
    assert main(["inspect", "--shape", "t5-tiny", "--method", "lora:r=2", "--method", "prefix:length=3"]) == 0
    out = capsys.readouterr().out
    assert "delta lora: 576 parameters" in out  # 12 sites (q, v of 4 self- and 2 cross-attentions) · r(16 + 8)
    assert "encoder.0.attn.q" in out and "◀ lora" in out and "◀ prefix" in out


def test_inspect_a_local_checkpoint(tmp_path, capsys):
    tiny_t5().float().save_pretrained(tmp_path / "ckpt")
    assert main(["inspect", "--model", str(tmp_path / "ckpt"), "--method", "bitfit", "--attached-only"]) == 0
    out = capsys.readouterr().out
    assert "delta bitfit" in out and "encoder.embed" not in out


def test_inspect_decoder_only_shapes(capsys):
    assert main(["inspect", "--shape", "gpt2-tiny", "--method", "lora:r=2:sites=*.attn.qkv"]) == 0
    out = capsys.readouterr().out
    assert "decoder.0.attn.qkv" in out and "16→48" in out and "◀ lora" in out
    assert "delta lora: 256 parameters" in out  # 2 layers · r(16 + 48)
    assert main(["inspect", "--shape", "llama-tiny", "--method", "prefix:length=3"]) == 0
    out = capsys.readouterr().out
    assert "decoder.0.attn.kv" in out and "memory   2×4" in out  # 2 key/value heads (of 4 query heads) of dim 4


def test_count_gpt2_and_tinyllama_shapes(capsys):
    assert main(["count", "--shape", "gpt2"]) == 0
    assert "124,439,808 base parameters" in capsys.readouterr().out  # GPT-2 small, its LM head tied
    assert main(["count", "--shape", "tinyllama-1.1b"]) == 0
    assert "1,100,048,384 base parameters" in capsys.readouterr().out  # TinyLlama-1.1B


def test_count_t5_base_against_the_paper(capsys):
    assert main(["count", "--shape", "t5-base"]) == 0
    out = capsys.readouterr().out
    assert "222,903,552 base parameters" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert rows["lora"][1] == "884,736" and rows["lora"][3] == "0.38"
    assert rows["prompt"][1] == "76,800"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["count", "--method", "lorra"], "unknown delta method 'lorra'; did you mean lora"),
        (["count", "--method", "lora:rank=4"], "lora has no option 'rank'"),
        (["count", "--method", "lora:r"], "is not key=value"),
        (["inspect", "--shape", "t5-tiny", "--method", "lora:sites=*.attn.qq"], "closest valid names"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_inspect_and_count_the_real_minilm(capsys):
    from deltactl.train.run import default_model_path

    folder = default_model_path()
    assert main(["inspect", "--model", folder, "--method", "lora", "--attached-only"]) == 0
    assert "encoder.5.attn.v" in capsys.readouterr().out
    assert main(["count", "--model", folder, "--method", "lora"]) == 0
    assert "73,728" in capsys.readouterr().out  # 6 layers · (q, v) · 8 · (384 + 384)
