"""The transformers compatibility layer: the only door to transformers internals, and replays that check themselves."""

import inspect
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_t5
from test_conformance import config, perturb
from transformers import DynamicCache, EncoderDecoderCache

import deltactl as dc
from deltactl.backbones import compat
from deltactl.theory import model as theory_model
from deltactl.theory.model import model_system, state_gradients, trainable_controls

ROOT = Path(__file__).resolve().parents[1]
# Anything below transformers' top-level public names, or a private attribute of its objects.
PRIVATE = re.compile(
    r"from transformers\.\w|import transformers\.\w|\._attn_implementation|_relative_position_bucket|"
    r"\.compute_bias\(|eager_attention_forward|ALL_ATTENTION_FUNCTIONS|past_key_values|\.activations\b"
)


def test_no_module_outside_compat_touches_transformers_internals():
    offenders = []
    for folder in ("deltactl", "experiments", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "compat.py" and path.parent.name == "backbones":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if PRIVATE.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "transformers internals outside deltactl/backbones/compat.py:\n" + "\n".join(offenders)


def test_the_grep_sees_what_it_should():  # the pattern itself must catch the kinds of use it forbids
    for line in ("from transformers.models.t5.modeling_t5 import T5Attention", "import transformers.cache_utils",
                 "config._attn_implementation = 'eager'", "kwargs.pop('past_key_values')",
                 "from transformers.activations import ACT2FN"):
        assert PRIVATE.search(line), line
    assert not PRIVATE.search("from transformers import T5Config, AutoModel")


class _Block(torch.nn.Module):
    """A stand-in for a transformers block whose cache argument has a name no release has used yet."""

    def forward(self, hidden, mask=None, kv_memory=None, use_cache=None, **kwargs):
        return hidden


def test_bind_call_names_positional_arguments_by_the_signature():
    block = _Block()
    h, m = torch.ones(1), torch.zeros(1)
    named = compat.bind_call(block.forward, (h, m), {"extra": 3})
    assert list(named) == ["hidden", "mask", "extra"] and named["hidden"] is h and named["mask"] is m
    with pytest.raises(TypeError, match=f"_Block.forward.*transformers {re.escape(compat.VERSION)}"):
        compat.bind_call(block.forward, (h, m, None, None, 5), {})


def test_replay_drops_every_cache_by_type_and_turns_the_cache_off():
    block = _Block()
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    h = torch.ones(1)
    named = compat.replay_call(block.forward, (h, None, cache), {"use_cache": True, "renamed_cache": DynamicCache()})
    assert named == {"hidden": h, "mask": None, "use_cache": False}
    no_flag = compat.replay_call(lambda hidden, cache=None: hidden, (h, DynamicCache()), {})
    assert no_flag == {"hidden": h}  # use_cache only where the function takes it


def test_first_argument_is_found_positionally_or_by_name():
    block = _Block()
    h = torch.ones(1)
    assert compat.first_argument(block.forward, (h,), {}) is h
    assert compat.first_argument(block.forward, (), {"hidden": h}) is h
    args, kwargs = compat.replace_first_argument(block.forward, (), {"hidden": h, "mask": None}, 2 * h)
    assert args == () and torch.equal(kwargs["hidden"], 2 * h)


def test_require_arguments_names_the_release():
    with pytest.raises(TypeError, match=f"no argument 'position_bias'.*transformers {re.escape(compat.VERSION)}"):
        compat.require_arguments(_Block().forward, "hidden", "position_bias")


def test_eager_attention_and_relative_positions_come_from_the_installed_release():
    from transformers.models.t5 import modeling_t5  # the reference: the release's own module

    assert compat.eager_attention("t5") is modeling_t5.eager_attention_forward
    model = tiny_t5()
    attention = model.encoder.block[0].layer[0].SelfAttention
    bias = compat.relative_position_bias(attention, 3, 5)
    assert bias.shape == (1, model.config.num_heads, 3, 5)
    torch.testing.assert_close(bias, attention.compute_bias(3, 5), atol=0, rtol=0)


# ---- the replay self-check ---------------------------------------------------------------------------------------


def _old_replay(function, args, kwargs):
    """The replay before the compatibility layer: caches removed by one argument name only."""
    named = compat.bind_call(function, args, kwargs)
    named.pop("past_key_values", None)
    return named


def _controlled(attention):
    model = tiny_t5(attn_implementation=attention)
    perturb(dc.attach(model, config("lora")))
    model.eval()
    return model, {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}


def _records_a_cache(model, batch):
    seen = []
    hook = model.decoder.block[0].register_forward_pre_hook(
        lambda m, a, k: seen.extend(v for v in (*a, *k.values()) if compat.is_cache(v)), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    hook.remove()
    return bool(seen)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_replay_that_keeps_the_cache_is_refused_loudly(attention, monkeypatch):
    model, batch = _controlled(attention)
    if "past_key_values" in inspect.signature(model.decoder.block[0].forward).parameters:
        pytest.skip("this release still calls the cache past_key_values: the old replay dropped it")
    if not _records_a_cache(model, batch):
        pytest.skip("this release passes no cache to the decoder blocks of a training forward")
    monkeypatch.setattr(compat, "replay_call", _old_replay)
    with pytest.raises(RuntimeError, match=f"disagrees with the model's own forward.*{re.escape(compat.VERSION)}"):
        model_system(model, batch)


def test_without_the_self_check_the_stale_cache_is_silently_wrong_under_sdpa(monkeypatch):
    """Why the SDPA theory tests exist: the old replay ran under SDPA and gave wrong costates."""
    model, batch = _controlled("sdpa")
    if "past_key_values" in inspect.signature(model.decoder.block[0].forward).parameters:
        pytest.skip("this release still calls the cache past_key_values: the old replay dropped it")
    if not _records_a_cache(model, batch):
        pytest.skip("this release passes no cache to the decoder blocks of a training forward")
    monkeypatch.setattr(compat, "replay_call", _old_replay)
    monkeypatch.setattr(theory_model, "_verify_replay", lambda *a: None)
    view = model_system(model, batch).costates(trainable_controls(model))
    model.zero_grad()
    reference = state_gradients(model, batch)
    worst = max(((view.costates[n] + g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
                for n, g in reference.items())
    assert worst > 1e-6  # the costate test under SDPA (test_theory_pontryagin) would have failed


def test_the_self_check_runs_once_per_model_and_controls(monkeypatch):
    model, batch = _controlled("eager")
    calls = []
    original = theory_model._compare
    monkeypatch.setattr(theory_model, "_compare", lambda *a: calls.append(a[0]) or original(*a))
    model_system(model, batch)
    first = len(calls)
    assert first > 0 and "loss" in calls and "decoder.0" in calls
    model_system(model, batch)
    assert len(calls) == first  # verified already


def test_a_rollout_that_runs_blocks_twice_is_refused():
    model = tiny_t5()
    backbone = dc.backbone_for(model)
    batch = tiny_batch()

    def run_the_encoder_once_more(module, args, kwargs):
        module.encoder(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"])

    again = model.register_forward_pre_hook(run_the_encoder_once_more, with_kwargs=True)
    with pytest.raises(RuntimeError, match="rollout recorded 6 encoder states for 2 blocks"):
        backbone.rollout(**batch)
    again.remove()
    trajectory = backbone.rollout(**batch)
    assert len(trajectory["encoder"]) == 3 and len(trajectory["decoder"]) == 3
