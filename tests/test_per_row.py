"""Mixed-delta batches: row i runs under the delta named for it, equal to running that row under that delta alone."""

import pytest
import torch
from conftest import VOCAB, tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5

import deltactl as dc


def randomise(delta, seed):
    """δ away from its initial value (LoRA's B = 0 would make every delta act as none)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if "ia3" in delta.name else 0.0))
    return delta


def t5_with_three_deltas():
    model = tiny_t5(dtype=torch.float32)
    randomise(dc.attach(model, "lora", r=2, name="a"), 1)
    randomise(dc.attach(model, "lora", r=4, sites=("*.attn.q", "*.cross.v", "*.ffn.wo"), name="b"), 2)
    randomise(dc.attach(model, "ia3", name="ia3"), 3)
    return model


def alone(model, name, **batch):
    """The model's output on ``batch`` with only ``name`` acting (None: no delta)."""
    if name is None:
        with dc.disabled(model):
            return model(**batch).logits
    was = [n for n, d in dc.deltas(model).items() if d.active]
    dc.use(model, name)
    try:
        return model(**batch).logits
    finally:
        dc.use(model, *was)


NAMES = ["a", "b", None, "ia3", "a"]
# float32 sums run in another order when the kernels block a batch of another size: a few ulps of logits near 2
# (up to 1.2e-6 seen); a mix-up of rows moves them by over 1e-3
ROWS_ATOL = 1e-5


def test_each_row_equals_the_whole_batch_under_its_delta_t5():
    model = t5_with_three_deltas()
    batch = tiny_batch(batch=len(NAMES))
    with dc.per_row(model, NAMES):
        mixed = model(**batch).logits
    for i, name in enumerate(NAMES):
        reference = alone(model, name, **batch)[i]
        torch.testing.assert_close(mixed[i], reference, atol=ROWS_ATOL, rtol=0)
    # the deltas differ from each other and from the base, so a mix-up of rows would show
    outs = [alone(model, n, **batch)[1] for n in ("a", "b", None, "ia3")]
    assert min((x - y).abs().max() for i, x in enumerate(outs) for y in outs[i + 1:]) > 1e-3


def test_each_row_equals_that_row_run_alone():
    model = t5_with_three_deltas()
    batch = tiny_batch(batch=len(NAMES))
    batch["attention_mask"][:] = 1  # a row alone has no padding to share
    with dc.per_row(model, NAMES):
        mixed = model(**batch).logits
    for i, name in enumerate(NAMES):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        torch.testing.assert_close(mixed[i : i + 1], alone(model, name, **row), atol=ROWS_ATOL, rtol=0)


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_per_row_equals_generate_under_each_delta(beams):
    model = t5_with_three_deltas()
    batch = tiny_batch(batch=len(NAMES))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=beams, num_return_sequences=beams,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    with dc.per_row(model, NAMES):
        mixed = model.generate(**inputs, **kwargs)
    for i, name in enumerate(NAMES):
        if name is None:
            with dc.disabled(model):
                expected = model.generate(**inputs, **kwargs)
        else:
            dc.use(model, name)
            expected = model.generate(**inputs, **kwargs)
            dc.use(model, *dc.deltas(model))
        rows = slice(i * beams, (i + 1) * beams)
        assert torch.equal(mixed[rows, : expected.shape[1]], expected[rows]), (i, name)


def test_gradients_reach_each_delta_from_its_rows_only():
    model = t5_with_three_deltas()
    batch = tiny_batch(batch=len(NAMES))
    g = torch.Generator().manual_seed(5)
    batch["labels"] = torch.randint(2, VOCAB, batch["decoder_input_ids"].shape, generator=g)
    for d in dc.deltas(model).values():
        d.unfreeze()
    with dc.per_row(model, NAMES):
        out = model(**batch).logits
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    loss.backward()
    mixed = {n: [p.grad.clone() for p in d.parameters()] for n, d in dc.deltas(model).items()}
    model.zero_grad()
    for name in ("a", "b", "ia3"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        sub = {k: v[rows] for k, v in batch.items() if k != "labels"}
        logits = alone(model, name, **sub)
        alone_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][rows].flatten(),
                                                       reduction="sum")
        grads = torch.autograd.grad(alone_loss, list(dc.deltas(model)[name].parameters()))
        for g_mixed, g_alone in zip(mixed[name], grads):
            torch.testing.assert_close(g_mixed, g_alone, atol=1e-5, rtol=1e-5)


def test_bert_adapter_and_bitfit_rows():
    model = tiny_bert(dtype=torch.float32)
    randomise(dc.attach(model, "adapter", name="adapter"), 1)
    randomise(dc.attach(model, "bitfit", name="bitfit"), 2)
    names = ["bitfit", None, "adapter", "bitfit"]
    batch = tiny_bert_batch(batch=len(names))
    with dc.per_row(model, names):
        mixed = model(**batch).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, name, **batch)[i], atol=ROWS_ATOL, rtol=0)


def test_the_model_acts_as_before_after_the_block():
    model = t5_with_three_deltas()
    dc.use(model, "b")
    batch = tiny_batch(batch=len(NAMES))
    before = model(**batch).logits
    with dc.per_row(model, NAMES):
        model(**batch)
    assert torch.equal(model(**batch).logits, before)
    with pytest.raises(RuntimeError), dc.per_row(model, NAMES):
        raise RuntimeError("inside")
    assert torch.equal(model(**batch).logits, before)


def test_bad_names_and_unfit_deltas_are_refused():
    model = t5_with_three_deltas()
    with pytest.raises(ValueError, match=r"no delta named 'aa' on this model; did you mean a"):
        dc.per_row(model, ["aa"])
    batch = tiny_batch(batch=3)
    with pytest.raises(ValueError, match=r"per_row was given 5 delta names, but a batch of 3 rows"):
        with dc.per_row(model, NAMES):
            model(**batch)
    dc.attach(model, "prefix", length=2, name="p")
    with pytest.raises(ValueError, match=r"delta 'p' \(prefix\) acts at memory sites"):
        dc.per_row(model, ["p", "a"])
    dc.deltas(model)["p"].detach()
    dc.deltas(model)["a"].merge()
    with pytest.raises(ValueError, match=r"delta 'a' is merged into the weights"):
        dc.per_row(model, ["a", "b"])
    with pytest.raises(ValueError, match=r"delta 'a' is merged into the weights and would act on every row"):
        dc.per_row(model, ["b", None])
