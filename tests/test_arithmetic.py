"""Delta arithmetic: combinations are checked on the weights they write (against each delta's own merge) and
against PEFT's ``add_weighted_adapter`` on identical LoRA weights (float64)."""

import copy

import pytest
import torch
from conftest import tiny_batch, tiny_bert, tiny_t5
from peft import PeftModel

import deltactl as dc
from deltactl.methods.arithmetic import combine, negate

WEIGHTS = [0.7, -0.4]
# PEFT holds combination weights as float32 tensors (and "linear" takes √|w·s|): with s = α/r = 2 these weights and
# their roots are exact in float32, so PEFT's and deltactl's float64 results agree to rounding, not to float32.
PEFT_WEIGHTS = [0.5, -0.125]


def randomise(delta, seed, centre=0.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return delta


def weight_change(model, delta) -> dict:
    """θ' − θ for every base weight the delta's merge writes (a T5 bias BitFit creates counts from 0)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("deltactl.")}
    was = [n for n, d in dc.deltas(model).items() if d.active]
    dc.use(model, delta.name)
    delta.merge()
    after = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("deltactl.")}
    delta.unmerge()
    dc.use(model, *was)
    return {n: after[n] - before.get(n, torch.zeros_like(after[n])) for n in after
            if n not in before or not torch.equal(after[n], before[n])}


def assert_changes(actual: dict, expected: dict, atol=1e-12):
    names = set(actual) | set(expected)
    for n in names:
        a = actual.get(n, torch.zeros_like(expected.get(n, actual.get(n))))
        e = expected.get(n, torch.zeros_like(a))
        torch.testing.assert_close(a, e, atol=atol, rtol=0, msg=n)


def two(model, method, centre=0.0, **options):
    return [randomise(dc.attach(model, method, name=n, **options), seed, centre) for seed, n in ((1, "x"), (2, "y"))]


@pytest.mark.parametrize("method, centre, make, options", [
    ("bitfit", 0.0, tiny_t5, {"sites": ("*.q", "*.v", "*.wo")}),  # T5's RMS norms have no bias to merge into
    ("bitfit", 0.0, tiny_bert, {}), ("ia3", 1.0, tiny_t5, {}), ("ln_tuning", 0.0, tiny_bert, {}),
])
def test_linear_combination_is_task_arithmetic_on_the_weights(method, centre, make, options):
    model = make()
    x, y = two(model, method, centre, **options)
    expected = {}
    for w, d in zip(WEIGHTS, (x, y)):
        for n, change in weight_change(model, d).items():
            expected[n] = expected.get(n, 0) + w * change
    combined = combine(model, ["x", "y"], WEIGHTS)
    assert [n for n, d in dc.deltas(model).items() if d.active] == [combined.name]
    assert_changes(weight_change(model, combined), expected)
    assert_changes(weight_change(model, negate(model, "x")), {n: -c for n, c in weight_change(model, x).items()})


def test_lora_cat_is_the_exact_weighted_sum_and_svd_its_best_low_rank_approximation():
    model = tiny_t5()
    x, y = two(model, "lora", r=2)
    expected = {}
    for w, d in zip(WEIGHTS, (x, y)):
        for n, change in weight_change(model, d).items():
            expected[n] = expected.get(n, 0) + w * change
    cat = combine(model, ["x", "y"], WEIGHTS, how="cat")
    assert cat.config.r == 4 and cat.config.alpha == 4.0
    assert_changes(weight_change(model, cat), expected)
    assert_changes(weight_change(model, combine(model, ["x", "y"], WEIGHTS, how="svd", r=4)), expected, atol=1e-10)
    rank_one = weight_change(model, combine(model, ["x", "y"], WEIGHTS, how="svd", r=1))
    for n, target in expected.items():  # Eckart–Young: the truncated SVD, computed here independently
        U, S, Vh = torch.linalg.svd(target)
        torch.testing.assert_close(rank_one[n], S[0] * torch.outer(U[:, 0], Vh[0]), atol=1e-10, rtol=0)
    assert_changes(weight_change(model, negate(model, "x")), {n: -c for n, c in weight_change(model, x).items()})


@pytest.mark.parametrize("how", ["linear", "cat", "svd"])
def test_lora_combinations_equal_peft_add_weighted_adapter(how, tmp_path):
    model = tiny_t5()
    reference = copy.deepcopy(model)
    x, y = two(model, "lora", r=2, alpha=4.0)
    for d in (x, y):
        dc.export_peft(d, tmp_path / d.name)
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "x", adapter_name="x")
    peft_model.load_adapter(tmp_path / "y", adapter_name="y")
    peft_model.add_weighted_adapter(["x", "y"], PEFT_WEIGHTS, "xy", combination_type=how)
    peft_model.set_adapter("xy")
    combined = combine(model, ["x", "y"], PEFT_WEIGHTS, how=how)
    assert combined.active and combined.config.alpha == combined.config.r  # scale 1, as PEFT
    batch = tiny_batch(batch=3)
    ours = model(**batch).logits
    with dc.disabled(model):
        assert (ours - model(**batch).logits).abs().max() > 1e-3
    torch.testing.assert_close(ours, peft_model(**batch).logits, atol=1e-10, rtol=0)


def test_combinations_that_make_no_sense_are_refused():
    model = tiny_t5()
    dc.attach(model, "lora", r=2, name="l2")
    dc.attach(model, "lora", r=4, name="l4")
    dc.attach(model, "lora", r=2, sites=("*.q",), name="q_only")
    dc.attach(model, "bitfit", name="b")
    dc.attach(model, "adapter", r=2, name="a1")
    dc.attach(model, "adapter", r=2, name="a2")
    cases = [
        ((["l2", "b"], [1, 1]), {}, r"one method, got l2 \(lora\), b \(bitfit\)"),
        ((["l2", "q_only"], [1, 1]), {}, r"'q_only' acts on other sites than 'l2'"),
        ((["l2", "l4"], [1, 1]), {"how": "linear"}, r"equal ranks, got \[2, 4\]; use how='cat' or 'svd'"),
        ((["b"], [1]), {"how": "svd"}, r"combination 'svd' is for LoRA"),
        ((["a1", "a2"], [1, 1]), {}, r"weights must sum to 1 \(they sum to 2\)"),
        ((["l2", "nope"], [1, 1]), {}, r"no delta named 'nope'"),
        ((["l2", "l4"], [1]), {"how": "cat"}, r"2 deltas and 1 weights"),
        ((["l2"], [1]), {"how": "ties"}, r"unknown combination 'ties'; choose one of linear, cat, svd"),
    ]
    attached = list(dc.deltas(model))
    for (names, weights), options, message in cases:
        with pytest.raises(ValueError, match=message):
            combine(model, names, weights, **options)
    assert list(dc.deltas(model)) == attached  # nothing half-attached
    assert combine(model, ["a1", "a2"], [0.5, 0.5]).config.r == 2
