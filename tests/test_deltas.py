"""Several named deltas on one model: add, switch the active one, disable all, delete; freezing for sequential
combination; the penalty the trainer adds."""

import pytest
import torch
from conftest import tiny_batch, tiny_t5

import deltactl as dc


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomise(delta, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def alone(method, seed, batch, **options):
    """The logits of a fresh model with only this delta, randomised like in the test."""
    model = tiny_t5()
    randomise(dc.attach(model, method, **options), seed)
    return logits(model, batch)


def test_add_switch_disable_delete():
    model, batch = tiny_t5(), tiny_batch()
    base = logits(model, batch)
    a = dc.attach(model, "lora", name="task_a", r=2)
    b = dc.attach(model, "lora", name="task_b", r=2)
    randomise(a, 1)
    randomise(b, 2)
    assert list(dc.deltas(model)) == ["task_a", "task_b"]

    dc.use(model, "task_a")
    assert torch.equal(logits(model, batch), alone("lora", 1, batch, r=2))
    assert trainable(model) == {f"deltactl.task_a.{n}" for n, _ in a.named_parameters()}
    dc.use(model, "task_b")
    assert torch.equal(logits(model, batch), alone("lora", 2, batch, r=2))
    assert trainable(model) == {f"deltactl.task_b.{n}" for n, _ in b.named_parameters()}

    dc.disable_all(model)
    assert torch.equal(logits(model, batch), base) and not trainable(model)
    with pytest.raises(ValueError, match="no delta named 'task_c'.*attached: task_a, task_b"):
        dc.use(model, "task_c")

    dc.use(model, "task_a")
    with dc.disabled(model):
        assert torch.equal(logits(model, batch), base)
    assert torch.equal(logits(model, batch), alone("lora", 1, batch, r=2))

    a.detach()  # delete
    assert list(dc.deltas(model)) == ["task_b"] and not b.active
    b.enable()
    assert torch.equal(logits(model, batch), alone("lora", 2, batch, r=2))
    b.detach()
    assert not hasattr(model, "deltactl") and torch.equal(logits(model, batch), base)


def test_switching_keeps_the_attachment_order_of_laws():
    """Two deltas at one site compose in attachment order (a then b), however they were switched in between."""
    model, batch = tiny_t5(), tiny_batch()
    a = dc.attach(model, "adapter", name="a", r=3, sites=("encoder.0.ffn.out",))
    b = dc.attach(model, "adapter", name="b", r=3, sites=("encoder.0.ffn.out",))
    randomise(a, 1)
    randomise(b, 2)
    together = logits(model, batch)
    a.disable()
    a.enable()  # re-enabled after b: must still act before b
    assert torch.equal(logits(model, batch), together)
    reference = tiny_t5()
    chained = dc.attach(reference, dc.chain(a.config, b.config))
    chained.controller.parts[0].load_state_dict(a.controller.state_dict())
    chained.controller.parts[1].load_state_dict(b.controller.state_dict())
    assert torch.equal(logits(reference, batch), together)


def test_simultaneous_and_sequential_combination():
    model, batch = tiny_t5(), tiny_batch()
    prompt = dc.attach(model, "prompt", length=2)
    bitfit = dc.attach(model, "bitfit")
    adapter = dc.attach(model, "adapter", r=3)
    assert trainable(model) == {f"deltactl.{d.name}.{n}" for d in (prompt, bitfit, adapter) for n, _ in
                                d.named_parameters()}
    # sequential: stage 1 (prompt) done → frozen but acting; stage 2 trains only its own δ
    randomise(adapter, 3)
    prompt.freeze()
    bitfit.disable()
    assert trainable(model) == {f"deltactl.adapter.{n}" for n, _ in adapter.named_parameters()}
    before = {n: p.clone() for n, p in prompt.named_parameters()}
    out = model(**batch, labels=batch["decoder_input_ids"])
    out.loss.backward()
    assert all(p.grad is None for p in prompt.parameters()) and all(p.grad is not None for p in adapter.parameters())
    assert all(torch.equal(p, before[n]) for n, p in prompt.named_parameters())
    prompt.unfreeze()
    assert {f"deltactl.prompt.{n}" for n, _ in prompt.named_parameters()} <= trainable(model)


def test_names_and_merged_deltas_are_guarded():
    model = tiny_t5()
    dc.attach(model, "lora", name="x", r=2)
    with pytest.raises(ValueError, match="already attached"):
        dc.attach(model, "lora", name="x", r=2)
    with pytest.raises(ValueError, match="without dots"):
        dc.attach(model, "lora", name="a.b", r=2)
    merged = dc.deltas(model)["x"].merge()
    with pytest.raises(RuntimeError, match="merged into the weights; unmerge it"):
        merged.disable()
    with pytest.raises(RuntimeError, match="already merged"):
        merged.merge()
    merged.detach()


def test_penalty_sums_the_training_deltas():
    model = tiny_t5()
    assert dc.penalty(model) is None
    dc.attach(model, "lora", r=2)
    assert dc.penalty(model) is None  # LoRA has no regulariser
    diff = dc.attach(model, "diff_pruning", sites=("encoder.0.attn.q.weight",), l0=2.0)
    expected = diff.controller.penalty()
    assert 0 < expected.item() <= 2.0 and torch.equal(dc.penalty(model), expected)
    diff.freeze()
    assert dc.penalty(model) is None
