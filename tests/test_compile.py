"""torch.compile on a model with attached controllers: one graph (the hooks add no graph break), and compiled
outputs and gradients equal eager ones. Inductor's C++ build takes minutes on a small CPU, so the compiled run here
uses the aot_eager backend (Dynamo's capture and AOTAutograd's joint graph, without code generation);
``benchmarks/compile.py`` times inductor against eager."""

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5

import deltactl as dc

METHODS = {"lora": {"r": 2}, "ia3": {}, "adapter": {"r": 2}, "prefix": {"length": 2}, "prompt": {"length": 2}}
# one law of each hook kind (linear output, linear input, branch, memory, sequence); Dynamo takes ~15 s each here
CASES = [("t5", "lora"), ("t5", "prefix"), ("t5", "prompt"), ("bert", "ia3"), ("bert", "adapter")]


def randomise(delta):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family, method", CASES)
def test_attached_controllers_add_no_graph_break(family, method):
    model = tiny_t5(dtype=torch.float32) if family == "t5" else tiny_bert(dtype=torch.float32)
    batch = tiny_batch(batch=2) if family == "t5" else tiny_bert_batch(batch=2)
    base = torch._dynamo.explain(model)(**batch)
    dc.attach(model, method, **METHODS[method])
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**batch)
    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == base.graph_break_count, reasons
    assert explained.graph_count == base.graph_count


def test_compiled_lora_t5_equals_eager_in_outputs_and_gradients():
    model = tiny_t5(dtype=torch.float32)
    delta = dc.attach(model, "lora", r=2)
    randomise(delta)
    batch = tiny_batch(batch=3)
    eager = model(**batch).logits
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in delta.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(**batch).logits
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    out.square().mean().backward()
    for g, e in zip((p.grad for p in delta.parameters()), eager_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    delta.disable()  # switching recompiles, rather than running stale laws
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
