"""LoRA variants against real PEFT on identical weights, and the conformance contracts on each LoRA option.

- rsLoRA (``rslora=True``, PEFT ``use_rslora``): scale α/√r. Logits, loss and the gradients of every A and B equal
  PEFT's on the tiny T5 variants and BERT (float64; B randomised on both sides so the update is non-zero).
- PiSSA / OLoRA (``init="pissa" | "olora"``, PEFT ``init_lora_weights``): PEFT refuses to initialise either in
  float64, so the comparison runs in float32, PEFT on a deep copy whose weights it replaces by W − s B₀A₀. The
  initial A and B are bit-identical to PEFT's; after B is moved on both sides, logits, loss and gradients agree to
  float32 rounding (deltactl adds s (BA − B₀A₀) x to W x where PEFT computes (W − s B₀A₀) x + s BA x). In float64,
  deltactl equals a base whose weight is replaced by W − s B₀A₀ as PEFT does it, and s B₀A₀ is the rank-r truncated
  SVD of W (PiSSA) or s Q_r R_r (OLoRA).
- DoRA (method ``dora``, PEFT ``use_dora``): m copied (and moved) with A and B; the initial m equals PEFT's bit for
  bit; logits, loss and the gradients of A, B and m equal PEFT's (float64, T5 variants and BERT), and so do the merged
  weights. PEFT detaches the norm ‖W + s BA‖ from the gradient, and so does deltactl by default.
- VeRA (method ``vera``, PEFT ``VeraConfig``): the seeded shared projections and the starting b, d equal PEFT's bit for
  bit; after moving b and d on both sides, logits, loss and their gradients equal PEFT's (float64).
- The conformance suite (tests/test_conformance.py) runs over registered methods with their example configs; the
  LoRA options are run through the same contract functions here, with the option added to LoRA's example config.
"""

import copy

import pytest
import test_conformance as conformance
import torch
from conftest import CASES, tiny_batch, tiny_t5
from peft import LoraConfig, get_peft_model

import deltactl as dc
from deltactl.control.controller import site_key

TOL = 1e-6  # float64
PEFT_CASES = ["t5_v1_0", "t5_v1_1", "t5_wide_heads", "bert"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def max_diff(a, b):
    return (a - b).abs().max().item()


def peft_pair(case, ours: dict, theirs: dict, method="lora", dtype=torch.float64):
    """(model with a deltactl delta on q and v, PEFT on an identical deep copy, the delta, [(our layer, PEFT's)])."""
    model = CASES[case].model(dtype=dtype)
    ref = copy.deepcopy(model)
    delta = dc.attach(model, method, sites=("*.q", "*.v"), **ours)
    targets = sorted({s.module.rsplit(".", 1)[-1] for s in delta.controller.sites})
    peft_model = get_peft_model(ref, LoraConfig(target_modules=targets, lora_dropout=0.0, **theirs))
    layers = [(delta.controller.layers[site_key(s.name)], peft_model.base_model.model.get_submodule(s.module))
              for s in delta.controller.sites]
    return model, peft_model, delta, layers


def lora_tensors(ours, theirs):
    return [(ours.A, theirs.lora_A["default"].weight), (ours.B, theirs.lora_B["default"].weight)]


def move_b(layers, seed=7, scale=0.3, peft=True):
    """Add the same random step to B on both sides, so the update (and the gradient w.r.t. A) is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ours, theirs in layers:
            step = torch.randn(ours.B.shape, generator=g, dtype=torch.float64) * scale
            ours.B.add_(step.to(ours.B.dtype))
            if peft:
                theirs.lora_B["default"].weight.add_(step.to(ours.B.dtype))


def compare(case, model, peft_model, pairs) -> dict:
    """Forward with labels and backward on both; max |difference| of logits, loss and the gradients of ``pairs``."""
    batch = CASES[case].with_labels(CASES[case].batch())
    out, ref_out = model(**batch), peft_model(**batch)
    out.loss.backward()
    ref_out.loss.backward()
    assert all(ours.grad.abs().max() > 0 for ours, _ in pairs)
    return {
        "logits": max_diff(out.logits, ref_out.logits),
        "loss": abs(out.loss.item() - ref_out.loss.item()),
        "grad": max(max_diff(ours.grad, theirs.grad) for ours, theirs in pairs),
        "grad_scale": max(ours.grad.abs().max().item() for ours, _ in pairs),
    }


# ---- rsLoRA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PEFT_CASES)
def test_rslora_matches_peft(case):
    r, alpha = 4, 8.0
    model, peft_model, delta, layers = peft_pair(case, {"r": r, "alpha": alpha, "rslora": True},
                                                 {"r": r, "lora_alpha": alpha, "use_rslora": True})
    with torch.no_grad():
        for ours, theirs in layers:
            assert ours.scale == theirs.scaling["default"] == alpha / r**0.5
            for mine, other in lora_tensors(ours, theirs):
                other.copy_(mine)
    move_b(layers)
    diffs = compare(case, model, peft_model, [p for pair in layers for p in lora_tensors(*pair)])
    assert max(diffs["logits"], diffs["loss"], diffs["grad"]) < TOL, diffs


# ---- PiSSA and OLoRA ---------------------------------------------------------------------------------------------

TOL32 = 2e-5  # relative to the compared values' scale: float32 rounding through a few layers


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("case", PEFT_CASES)
def test_pissa_and_olora_match_peft_in_float32(case, init):
    r, alpha = 2, 4.0
    model, peft_model, delta, layers = peft_pair(case, {"r": r, "alpha": alpha, "init": init},
                                                 {"r": r, "lora_alpha": alpha, "init_lora_weights": init},
                                                 dtype=torch.float32)
    base = CASES[case].model(dtype=torch.float32)
    for (ours, theirs), site in zip(layers, delta.controller.sites):
        for mine, other in lora_tensors(ours, theirs):
            assert torch.equal(mine, other)  # the same initial factors, bit for bit
        assert torch.equal(ours.A0, ours.A) and torch.equal(ours.B0, ours.B)
        # PEFT replaced its copy's weight; deltactl left the model's weight alone
        assert torch.equal(model.get_submodule(site.module).weight, base.get_submodule(site.module).weight)
        assert not torch.equal(theirs.base_layer.weight, base.get_submodule(site.module).weight)
    move_b(layers)
    diffs = compare(case, model, peft_model, [p for pair in layers for p in lora_tensors(*pair)])
    batch = CASES[case].batch()
    scale = model(**batch).logits.abs().max().item()
    assert diffs["logits"] < TOL32 * scale and diffs["grad"] < TOL32 * diffs["grad_scale"], diffs


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_equal_the_replaced_weight_in_float64(init):
    r, alpha = 3, 6.0
    model, batch = tiny_t5(), tiny_batch()
    reference = copy.deepcopy(model)
    delta = dc.attach(model, "lora", r=r, alpha=alpha, init=init)
    with torch.no_grad():
        for site in delta.controller.sites:
            layer = delta.controller.layers[site_key(site.name)]
            W = reference.get_submodule(site.module).weight
            initial = layer.scale * layer.B0 @ layer.A0
            if init == "pissa":  # s B₀A₀ is the rank-r truncated SVD of W
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                torch.testing.assert_close(initial, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-12, rtol=0)
            else:  # B₀ has orthonormal columns, A₀ is upper triangular
                torch.testing.assert_close(layer.B0.T @ layer.B0, torch.eye(r, dtype=W.dtype), atol=1e-12, rtol=0)
                assert torch.equal(layer.A0, layer.A0.triu())
            W.sub_(initial)  # PEFT's residual weight, formed in float64
            layer.B.add_(torch.randn_like(layer.B) * 0.3)
    plain = dc.attach(reference, "lora", r=r, alpha=alpha)
    with torch.no_grad():
        for site in plain.controller.sites:
            mine, theirs = plain.controller.layers[site_key(site.name)], delta.controller.layers[site_key(site.name)]
            mine.A.copy_(theirs.A)
            mine.B.copy_(theirs.B)
    assert max_diff(model(**batch).logits, reference(**batch).logits) < 1e-12


def test_init_and_rank_are_checked():
    with pytest.raises(ValueError, match="init must be one of default, pissa, olora; got 'svd'"):
        dc.attach(tiny_t5(), "lora", init="svd")
    with pytest.raises(ValueError, match=r"r = 9 > 8"):  # q is 16 → 8 on the tiny T5
        dc.attach(tiny_t5(), "lora", r=9, init="pissa")


# ---- the conformance contracts on each LoRA option ---------------------------------------------------------------

# Smaller scales than LoRA's default 16/2 where the suite's random δ (entries 0.3) would otherwise drive the tiny T5's
# float32 attention softmax so far that its rounding exceeds the central-difference tolerance: rsLoRA's default
# 16/√2 (2.4e-4 vs 2e-5 relative), and OLoRA, whose law subtracts s Q_r R_r, s times the weight's leading part
# (PiSSA divides its factors by s, so there s B₀A₀ is that part whatever s is). alpha = r gives s = 1.
OPTIONS = {
    "rslora": {"rslora": True, "alpha": 4.0}, "pissa": {"init": "pissa"}, "olora": {"init": "olora", "alpha": 2.0},
}


def with_options(monkeypatch, method, options):
    """Make the conformance suite's example config of ``method`` carry ``options``."""
    original = conformance.make_example
    monkeypatch.setattr(
        conformance, "make_example", lambda name, **kw: original(name, **({**options, **kw} if name == method else kw))
    )


@pytest.mark.parametrize("option", list(OPTIONS))
def test_lora_options_meet_the_contracts(case, option, monkeypatch, tmp_path, request):
    with_options(monkeypatch, "lora", OPTIONS[option])
    run_contracts(case, "lora", monkeypatch, tmp_path, request)


def run_contracts(case, method, monkeypatch, tmp_path, request, exact_gradient=True):
    conformance.test_zero_control_is_the_pretrained_model(case, method)
    conformance.test_detach_is_bit_exact(case, method)
    conformance.test_only_delta_trains_with_the_closed_form_count(case, method)
    if exact_gradient:
        conformance.test_functional_grad_and_jvp(case, method, monkeypatch)
    else:  # torch.func agrees with autograd (the gradient against the loss's derivative: see the DoRA test)
        functional_agrees_with_autograd(case, method)
    conformance.test_save_load_round_trip(case, method, tmp_path)
    conformance.test_chain_equals_applying_one_then_the_other(case, method)
    for dtype in conformance.MERGE_TOL:
        conformance.test_merge_equals_unmerged_and_unmerge_is_exact(case, method, dtype, request)


def functional_agrees_with_autograd(case, method):
    from torch.func import functional_call, grad, jvp

    model, batch = case.model(), case.with_labels(case.batch())
    delta = dc.attach(model, conformance.case_config(case, method))
    conformance.perturb(delta)
    names = [f"deltactl.{delta.name}.{n}" for n, _ in delta.named_parameters()]
    params = {n: p.detach().clone() for n, p in zip(names, delta.parameters())}

    def loss(theta):
        return functional_call(model, theta, args=(), kwargs=batch).loss

    g = grad(loss)(params)
    model(**batch).loss.backward()
    for n, p in zip(names, delta.parameters()):
        torch.testing.assert_close(g[n], p.grad, atol=1e-10, rtol=1e-8)
    tangent = {n: torch.randn_like(v) for n, v in params.items()}
    _, directional = jvp(loss, (params,), (tangent,))
    torch.testing.assert_close(directional, sum((g[n] * tangent[n]).sum() for n in names), atol=1e-6, rtol=1e-5)


# ---- PEFT's saved format -----------------------------------------------------------------------------------------


def t5_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("options", [{"rslora": True}, {"init": "pissa"}, {"init": "olora", "rslora": True}],
                         ids=["rslora", "pissa", "olora_rslora"])
def test_export_loads_in_peft_with_the_same_outputs(tmp_path, options):
    from peft import PeftModel

    model, batch = tiny_t5(), tiny_batch()
    reference = copy.deepcopy(model)
    delta = dc.attach(model, "lora", r=2, alpha=4.0, **options)
    move_b([(layer, None) for layer in delta.controller.layers.values()], peft=False)
    ours = t5_logits(model, batch)
    assert max_diff(ours, t5_logits(reference, batch)) > 1e-3
    dc.export_peft(delta, tmp_path)
    peft_model = PeftModel.from_pretrained(reference, tmp_path)  # on the original weights: PiSSA exports as rank 2r
    assert max_diff(t5_logits(peft_model, batch), ours) < 1e-12


def test_rslora_adapter_imports_with_its_outputs(tmp_path):
    model, batch = tiny_t5(), tiny_batch()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                                 use_rslora=True, init_lora_weights=False))
    expected = t5_logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    delta = dc.import_peft(model, tmp_path)
    assert delta.config.rslora and delta.config.r == 4
    assert max_diff(t5_logits(model, batch), expected) < 1e-12


# ---- DoRA --------------------------------------------------------------------------------------------------------


def dora_tensors(ours, theirs):
    return [*lora_tensors(ours, theirs), (ours.m, theirs.lora_magnitude_vector["default"].weight)]


@pytest.mark.parametrize("case", PEFT_CASES)
def test_dora_matches_peft(case):
    r, alpha = 2, 4.0
    model, peft_model, delta, layers = peft_pair(case, {"r": r, "alpha": alpha}, {"r": r, "lora_alpha": alpha,
                                                                                   "use_dora": True}, method="dora")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ours, theirs in layers:
            assert torch.equal(ours.m, theirs.lora_magnitude_vector["default"].weight)  # m₀ = ‖W‖ per output
            ours.m.mul_(1 + 0.3 * torch.randn(ours.m.shape, generator=g, dtype=ours.m.dtype))
            for mine, other in dora_tensors(ours, theirs):
                other.copy_(mine)
    move_b(layers)
    diffs = compare(case, model, peft_model, [p for pair in layers for p in dora_tensors(*pair)])
    assert max(diffs["logits"], diffs["loss"], diffs["grad"]) < TOL, diffs

    # merged weights: m ⊙ (W + s BA) / ‖W + s BA‖ on both sides
    with torch.no_grad():
        delta.merge()
        peft_model.merge_adapter()
        for site in delta.controller.sites:
            ours = model.get_submodule(site.module).weight
            theirs = peft_model.base_model.model.get_submodule(site.module).base_layer.weight
            assert max_diff(ours, theirs) < 1e-12


def test_dora_detached_norm_gradient():
    """With the norm detached, the gradient w.r.t. m is the loss's derivative and the one w.r.t. B is the
    derivative with n held fixed; detach_norm=False gives the loss's derivative for both."""
    case = CASES["bert"]  # float64 throughout
    batch = case.with_labels(case.batch())
    for detach in (True, False):
        model = case.model()
        delta = dc.attach(model, "dora", r=2, alpha=4.0, detach_norm=detach)
        conformance.perturb(delta, scale=0.5)
        model(**batch).loss.backward()
        for name in ("m", "B"):
            params = [getattr(layer, name) for layer in delta.controller.layers.values()]
            tangents = [torch.randn_like(p) for p in params]
            with torch.no_grad():
                losses = []
                for step in (1, -2, 1):  # to +ε, to −ε, back
                    for p, t in zip(params, tangents):
                        p.add_(t, alpha=1e-6 * step)
                    losses.append(model(**batch).loss.item())
            difference = (losses[0] - losses[1]) / 2e-6
            directional = sum((p.grad * t).sum().item() for p, t in zip(params, tangents))
            relative = abs(directional - difference) / abs(difference)
            if name == "m" or not detach:
                assert relative < 1e-6, (detach, name, directional, difference)
            else:
                assert relative > 1e-3, (detach, name, directional, difference)


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_merge_into_gpt2_conv1d_slices_equals_the_unmerged_delta(method):
    """GPT-2 stores (in, out) and fuses q, k, v: merging writes each law through Backbone.weight_target."""
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(input_ids=ids).logits
    delta = dc.attach(model, method, r=2, sites=("*.attn.q", "*.attn.v", "*.attn.o", "*.ffn.wi"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        unmerged = model(input_ids=ids).logits
        delta.merge()
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-10, rtol=0)
    assert (unmerged - base).abs().max() > 1e-3
    delta.unmerge()
    delta.detach()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("detach_norm", [True, False], ids=["detached", "exact"])
def test_dora_meets_the_contracts(case, detach_norm, monkeypatch, tmp_path, request):
    with_options(monkeypatch, "dora", {"detach_norm": detach_norm})
    run_contracts(case, "dora", monkeypatch, tmp_path, request, exact_gradient=not detach_norm)


@pytest.mark.parametrize("rslora", [False, True], ids=["dora", "dora_rslora"])
def test_dora_export_and_import_round_trip_through_peft(tmp_path, rslora):
    from peft import PeftModel

    model, batch = tiny_t5(), tiny_batch()
    reference, other = copy.deepcopy(model), copy.deepcopy(model)
    delta = dc.attach(model, "dora", r=2, alpha=4.0, rslora=rslora)
    conformance.perturb(delta)
    ours = t5_logits(model, batch)
    dc.export_peft(delta, tmp_path / "out")
    peft_model = PeftModel.from_pretrained(reference, tmp_path / "out")
    assert max_diff(t5_logits(peft_model, batch), ours) < 1e-12

    peft_model.save_pretrained(tmp_path / "back")  # PEFT's own save, imported
    imported = dc.import_peft(other, tmp_path / "back")
    assert (imported.config.method, imported.config.rslora) == ("dora", rslora)
    assert max_diff(t5_logits(other, batch), ours) < 1e-12


# ---- closed-form parameter counts on the T5-base shape (as tests/test_counts.py) ---------------------------------

D, L = 768, 12  # T5-base: d_model (= heads·d_kv), layers per stack; q and v of 3L attentions
COUNTS = {
    ("lora", (("rslora", True),)): 3 * L * 2 * 8 * (D + D),  # rsLoRA changes the scale, not the size
    ("lora", (("init", "pissa"),)): 3 * L * 2 * 8 * (D + D),  # A₀, B₀ are buffers, not δ
    ("dora", ()): 3 * L * 2 * (8 * (D + D) + D),  # r(d_in + d_out) + d_out (m) per site
    ("vera", ()): 3 * L * 2 * (D + 256),  # b (d_out) and d (r) per site; A and B are shared frozen buffers
}


@pytest.mark.parametrize(("method", "options"), list(COUNTS))
def test_closed_form_counts(method, options):
    from transformers import T5ForConditionalGeneration

    from deltactl.control.accounting import closed_form
    from deltactl.methods import make_config
    from deltactl.shapes import t5_config

    with torch.device("meta"):
        backbone = dc.backbone_for(T5ForConditionalGeneration(t5_config("t5-base")))
    assert closed_form(make_config(method, **dict(options)), backbone) == COUNTS[method, options]


# ---- VeRA --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", PEFT_CASES)
def test_vera_matches_peft(case):
    from peft import VeraConfig

    r = 4
    model = CASES[case].model()
    ref = copy.deepcopy(model)
    delta = dc.attach(model, "vera", r=r, sites=("*.q", "*.v"))
    targets = sorted({s.module.rsplit(".", 1)[-1] for s in delta.controller.sites})
    peft_model = get_peft_model(ref, VeraConfig(r=r, target_modules=targets, vera_dropout=0.0))
    ctl = delta.controller
    their_layers = [peft_model.base_model.model.get_submodule(s.module) for s in ctl.sites]
    # the same seeded projections and starting vectors, bit for bit
    assert torch.equal(ctl.A, their_layers[0].vera_A["default"])
    assert torch.equal(ctl.B, their_layers[0].vera_B["default"])
    pairs = []
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for site, theirs in zip(ctl.sites, their_layers):
            key = site_key(site.name)
            for ours, other in ((ctl.b[key], theirs.vera_lambda_b["default"]),
                                (ctl.d[key], theirs.vera_lambda_d["default"])):
                assert torch.equal(ours, other.to(ours.dtype))
                ours.add_(torch.randn(ours.shape, generator=g, dtype=ours.dtype) * 0.3)
                other.copy_(ours)
                pairs.append((ours, other))
    diffs = compare(case, model, peft_model, pairs)
    assert max(diffs["logits"], diffs["loss"], diffs["grad"]) < TOL, diffs


def test_vera_meets_the_contracts(case, monkeypatch, tmp_path, request):
    run_contracts(case, "vera", monkeypatch, tmp_path, request)
