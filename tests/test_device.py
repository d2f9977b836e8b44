"""Device-correctness without a GPU: nothing inside a forward is created on the CPU by default.

Two mechanisms, used together (``off_the_default_device``):

- the default device is ``meta`` for the length of the call while the model, δ and inputs stay on the CPU: a tensor
  made without ``device=`` (``torch.zeros(3)``, ``torch.arange(n)``, ``torch.randn(..., generator=g)``) is then a
  meta tensor, and mixing it with the CPU tensors raises, or it leaks into an output, which the tests check is on
  the CPU — what a stray CPU tensor does next to CUDA tensors;
- ``StrayFactories``, a TorchFunctionMode, names every factory call (the functions ``torch.set_default_device``
  redirects) made from deltactl's own code without ``device=``, with its file and line, including the ones that
  would not raise (0-dim tensors, tensors only indexed with).

The autograd engine runs backward functions without the caller's function modes, so deltactl's own autograd
Functions (Fastfood's transforms) have their backward wrapped to run under both checks too.

A third test moves the model and δ themselves to ``meta`` (no data at all) and runs forward and backward there;
transformers' own mask checks call ``.item()``, so those run without an attention mask. Last, every method runs
forward and backward under ``torch.autocast("cpu", dtype=torch.bfloat16)``.
"""

import os
import sys
from contextlib import contextmanager

import pytest
import torch
from conftest import CASES, tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from test_conformance import case_config, perturb
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import deltactl as dc
import deltactl.subspace  # noqa: F401 - its autograd Functions are looked up below
from deltactl.methods import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = sorted(REGISTRY)
PACKAGE = os.path.dirname(dc.__file__) + os.sep
SKIPPED = (os.path.dirname(torch.__file__) + os.sep, __file__)


def _caller() -> str | None:
    """``file:line`` of the innermost frame outside torch and this file, if it is deltactl's; None otherwise."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(SKIPPED):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PACKAGE):
        return None
    return f"deltactl/{os.path.relpath(frame.f_code.co_filename, PACKAGE)}:{frame.f_lineno}"


class StrayFactories(TorchFunctionMode):
    """Records factory calls (zeros, ones, arange, tensor, randn, full, eye, …) made by deltactl without ``device=``."""

    def __init__(self, calls: list[str] | None = None):
        super().__init__()
        self.calls = [] if calls is None else calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            where = _caller()
            if where is not None:
                self.calls.append(f"{where}: torch.{func.__name__} without device=")
        return func(*args, **kwargs)


def _custom_functions() -> list[type]:
    """deltactl's autograd Functions with a backward of their own (Fastfood's FWHT and permutation)."""
    found, todo = [], [torch.autograd.Function]
    while todo:
        for cls in todo.pop().__subclasses__():
            todo.append(cls)
            if cls.__module__.startswith("deltactl.") and "backward" in vars(cls):
                found.append(cls)
    return found


@contextmanager
def off_the_default_device():
    """Default device ``meta`` (inputs stay on the CPU) and the stray-factory recorder; fails on any recorded call.

    The autograd engine runs backward functions without the caller's function modes, so deltactl's own backward
    functions are wrapped to run under the same two checks.
    """
    stray = StrayFactories()
    originals = {cls: vars(cls)["backward"] for cls in _custom_functions()}

    def checked(backward):
        def run(ctx, *grads):
            with torch.device("meta"), StrayFactories(stray.calls):
                return backward(ctx, *grads)

        return staticmethod(run)

    for cls, backward in originals.items():
        cls.backward = checked(backward.__func__)
    try:
        with torch.device("meta"), stray:
            yield stray
    finally:
        for cls, backward in originals.items():
            cls.backward = backward
    assert not stray.calls, "tensors created on the default device inside the call:\n" + "\n".join(stray.calls)


def on_cpu(*tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            assert t.device.type == "cpu", f"a tensor made on the default device leaked out: {t.device}"


def finite_grads(delta):
    grads = [p.grad for p in delta.parameters()]
    assert all(g is not None and g.device.type == "cpu" and torch.isfinite(g).all() for g in grads)


# ---- the mechanism catches what it should ------------------------------------------------------------------------


def test_a_planted_stray_allocation_is_caught(monkeypatch):
    from deltactl.methods import bitfit

    model = tiny_t5(dtype=torch.float32)
    dc.attach(model, "bitfit")
    batch = tiny_batch()
    with off_the_default_device():
        model(**batch)  # clean as shipped
    monkeypatch.setattr(bitfit.Bias, "forward", lambda self, x, y: y + self.bias + torch.zeros(y.shape[-1]))
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):
        model(**batch)  # mixing raises
    with pytest.raises(AssertionError, match="torch.zeros without device="), off_the_default_device():
        try:
            model(**batch)
        except RuntimeError:
            pass  # the recorder has named the call already
    monkeypatch.setattr(bitfit.Bias, "forward", lambda self, x, y: y + self.bias * torch.tensor(2.0))
    with torch.device("meta"), StrayFactories() as stray:
        try:
            model(**batch)  # a 0-dim tensor may mix silently on a real device; the recorder names it all the same
        except RuntimeError:
            pass
    assert stray.calls and all("torch.tensor without device=" in c for c in stray.calls)


def test_a_stray_allocation_in_a_custom_backward_is_caught(monkeypatch):
    from deltactl.subspace import make_projection
    from deltactl.subspace.fwht import _FWHT

    P, z = make_projection("fastfood", 5, 64), torch.randn(5, requires_grad=True)
    backward = vars(_FWHT)["backward"].__func__
    planted = staticmethod(lambda ctx, grad: (backward(ctx, grad)[0] + torch.zeros(grad.shape[-1]), None))
    monkeypatch.setattr(_FWHT, "backward", planted)
    with pytest.raises(RuntimeError, match="meta"), off_the_default_device():
        P(z).sum().backward()


def test_the_recorder_names_deltactl_code_only():
    from deltactl.inference.manifold import pool

    stray = StrayFactories()
    state, mask = torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    with stray:
        torch.zeros(3)  # this file: not deltactl's
        pool(state, mask, "last")  # passes device=
    assert stray.calls == []


# ---- every method, every family: forward, backward and generate off the default device -----------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(CASES))
def test_method_allocates_nothing_on_the_default_device(name, method):
    case = CASES[name]
    model = case.model(dtype=torch.float32)
    delta = dc.attach(model, case_config(case, method))
    perturb(delta)
    plain, batch = case.batch(), case.with_labels(case.batch())
    with off_the_default_device():
        model.eval()
        on_cpu(*case.outputs(model, plain))
        on_cpu(*case.outputs(model, {k: v for k, v in plain.items() if k != "attention_mask"}))
        model.train()  # sampled gates (diff pruning), dropout
        out = model(**batch)
        out.loss.backward()
    on_cpu(out.loss, *out.values())
    finite_grads(delta)
    if case.family != "bert" and name != "t5_wide_heads":  # (transformers' cache cannot generate with 2 + 3 layers)
        model.eval()
        inputs = {k: v for k, v in plain.items() if k != "decoder_input_ids"}
        with off_the_default_device():
            tokens = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        on_cpu(tokens)


VARIANTS = [  # code paths the small examples do not take
    ("lora", {"dropout": 0.1, "rslora": True}), ("lora", {"init": "pissa"}), ("lora", {"init": "olora"}),
    ("dora", {"dropout": 0.1}), ("vera", {"dropout": 0.1}), ("prefix", {"reparameterize": False}),
    ("prompt", {"init": "random"}), ("loreft", {"tied": False, "dropout": 0.1}), ("direft", {"orthogonal": True}),
    ("adapter", {"activation": "gelu_new"}),
]


@pytest.mark.parametrize("method, options", VARIANTS, ids=[f"{m}-{'-'.join(o)}" for m, o in VARIANTS])
def test_method_options_allocate_nothing_on_the_default_device(method, options):
    case = CASES["t5_v1_0"]
    model = case.model(dtype=torch.float32).train()
    delta = dc.attach(model, case_config(case, method, **options))
    perturb(delta)
    step_off_the_default_device(model, delta, case.with_labels(case.batch()))


def step_off_the_default_device(model, delta, batch):
    """A training step's forward and backward with the default device elsewhere: the loss stays on the CPU and δ
    gets finite gradients."""
    with off_the_default_device():
        out = model(**batch)
        out.loss.backward()
    on_cpu(out.loss)
    finite_grads(delta)


def test_combinations_allocate_nothing_on_the_default_device():
    from test_conformance import config

    model = tiny_t5(dtype=torch.float32)
    delta = dc.attach(model, dc.chain(config("lora"), dc.sum(config("adapter"), config("bitfit", sites=("*.wo",)))))
    perturb(delta)
    step_off_the_default_device(model, delta, {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]})


def test_per_row_allocates_nothing_on_the_default_device():
    model = tiny_t5(dtype=torch.float32)
    perturb(dc.attach(model, "lora", r=2, name="a"))
    perturb(dc.attach(model, "ia3", name="b"), seed=1)
    batch = tiny_batch(batch=3)
    with dc.per_row(model, ["a", None, "b"]), off_the_default_device():
        on_cpu(model(**batch).logits)


# ---- model and δ on the meta device ------------------------------------------------------------------------------

META_CASES = ["t5_v1_0", "t5_v1_1", "bert", "gpt2", "llama"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", META_CASES)
def test_method_runs_with_model_and_delta_on_meta(name, method):
    case = CASES[name]
    model = case.model(dtype=torch.float32)
    if case.family == "gpt2":
        model.config.pad_token_id = None  # else transformers looks for padding in the ids (.item() on meta)
    delta = dc.attach(model, case_config(case, method))
    model.to("meta").train()
    batch = {k: v.to("meta") for k, v in case.with_labels(case.batch()).items() if k != "attention_mask"}
    out = model(**batch)
    out.loss.backward()
    assert out.logits.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in delta.parameters())


# ---- bfloat16 autocast -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["t5_v1_0", "t5_v1_1", "bert", "gpt2", "llama"])
def test_method_under_bfloat16_autocast(name, method):
    """Zero control gives the bare model's autocast outputs; a perturbed δ gives finite outputs of the same dtypes
    and finite float32 gradients."""
    case = CASES[name]
    model, batch = case.model(dtype=torch.float32), case.batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bare = case.outputs(model, batch)
        cfg = case_config(case, method)
        zero = dc.attach(model, cfg.zero())
        for x, y in zip(case.outputs(model, batch), bare, strict=True):
            assert x.dtype == y.dtype
            torch.testing.assert_close(x, y, atol=0, rtol=0)
        zero.detach()
        delta = dc.attach(model, cfg)
        perturb(delta, scale=0.1)
        outs = case.outputs(model, batch)
        loss = model(**case.with_labels(batch)).loss
    for x, y in zip(outs, bare, strict=True):
        assert x.dtype == y.dtype and torch.isfinite(x).all()
    loss.backward()
    assert all(p.dtype == torch.float32 for p in delta.parameters())
    finite_grads(delta)


# ---- subspace projections and wrappers ---------------------------------------------------------------------------

PROJECTIONS = [("dense", {}), ("sparse", {}), ("fastfood", {"kernel": "radix"}), ("fastfood", {"kernel": "butterfly"}),
               ("fastfood", {"block": 64})]


@pytest.mark.parametrize("kind, options", PROJECTIONS, ids=[f"{k}-{'-'.join(map(str, o.values()))}"
                                                             for k, o in PROJECTIONS])
def test_projection_allocates_nothing_on_the_default_device(kind, options):
    from deltactl.subspace import make_projection

    P = make_projection(kind, 5, 300, seed=1, **options)
    z = torch.randn(5, requires_grad=True)
    with off_the_default_device():
        y = P(z)
        y.pow(2).sum().backward()
        M = P.matrix()
    on_cpu(y, z.grad, M)
    assert torch.isfinite(z.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(P(z)).all()
    P.to("meta")  # the factors follow the module (and are renormalised there)
    assert all(b.device.type == "meta" for b in P.buffers())
    if kind != "sparse":  # (torch has no sparse matmul on meta)
        out = P(torch.zeros(5, device="meta", requires_grad=True))
        assert out.device.type == "meta" and out.shape == (300,)
    P.to(torch.float64)  # renormalising in another dtype stays on the module's device
    assert all(b.device.type == "meta" for b in P.buffers())


@pytest.mark.parametrize("projection", ["dense", "sparse", "fastfood"])
def test_subspace_wrappers_allocate_nothing_on_the_default_device(projection):
    from deltactl.subspace import intrinsic, subspace

    batch = {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}
    for wrap in (lambda m: subspace(m, "lora", d=6, r=2, said=True, projection=projection),
                 lambda m: intrinsic(m, d=6, projection=projection)):
        sub = wrap(tiny_t5(dtype=torch.float32))
        with torch.no_grad():
            sub.z.normal_()
        with off_the_default_device():
            loss = sub(**batch).loss
            loss.backward()
        on_cpu(loss, sub.z.grad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(sub(**batch).loss)


def test_intrinsic_prompt_follows_the_model_s_device():
    from deltactl.subspace import IntrinsicPrompt, PromptAutoencoder

    model = tiny_t5(dtype=torch.float32)
    dc.attach(model, "prompt", length=2)
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    back = PromptAutoencoder(2, 16, intrinsic=3, hidden=5)
    ipt = IntrinsicPrompt(model, name, back)
    batch = {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}
    with off_the_default_device():
        loss = ipt(**batch).loss
        loss.backward()
    on_cpu(loss, ipt.z.grad)
    model.to("meta")
    ipt = IntrinsicPrompt(model, name, back.to("meta"))  # z starts on the prompt's device
    assert ipt.z.device.type == "meta"
    batch = {k: v.to("meta") for k, v in tiny_batch().items() if k != "attention_mask"}
    assert ipt(**batch).logits.device.type == "meta"


# ---- inference-time loops ----------------------------------------------------------------------------------------


def _classifier():
    from deltactl.train.models import SequenceClassifier

    bert = tiny_bert(0, dtype=torch.float32, head=False, num_hidden_layers=3)
    torch.manual_seed(0)
    clf = SequenceClassifier(bert, 2).eval()
    delta = dc.attach(bert, "prefix", length=3, mid_dim=8)
    return clf, delta


def test_robust_prefix_allocates_nothing_on_the_default_device():
    from deltactl.inference import RobustPrefix, fit_manifold

    clf, delta = _classifier()
    batches = [tiny_bert_batch(seed=3 + i, batch=6, length=7) for i in range(3)]
    labels = [torch.tensor([0, 1, 0, 1, 0, 1]) for _ in batches]
    test = tiny_bert_batch(seed=9, batch=4)
    for readout, center in (("mean", "batch"), ("last", "train"), ("first", "batch")):
        with off_the_default_device():
            manifold = fit_manifold(delta, list(zip(batches, labels)), clf, readout=readout)
            robust = RobustPrefix(delta, manifold, clf, n_layers=3, steps=2, lr=0.05, center=center)
            result = robust(**test)
        on_cpu(result.outputs, *[s.basis for s in manifold.layers])
        assert len(result.costs) == 2 and all(map(lambda c: c == c, result.costs))


def test_bias_tuned_generation_allocates_nothing_on_the_default_device():
    from deltactl.inference import bias_tuned_generate, token_set_cost

    model, batch = tiny_t5(dtype=torch.float32), tiny_batch()
    delta = dc.attach(model, "bitfit")
    cost = token_set_cost(range(2, 30))
    with off_the_default_device():
        out = bias_tuned_generate(model, delta, cost, batch["input_ids"], batch["attention_mask"], max_new_tokens=3,
                                  layers=2, steps=1, lr=0.1, max_perplexity=1.0)
    on_cpu(out.sequences)
    assert [t for t, _ in out.attempts] == [2, 1, 0]


def test_universal_trigger_allocates_nothing_on_the_default_device():
    from deltactl.inference.attacks import universal_trigger

    clf, delta = _classifier()
    batches, vocabulary = [(tiny_bert_batch(seed=3, batch=4, length=7), None)], torch.arange(2, 64)
    with off_the_default_device():
        trigger = universal_trigger(clf, delta.backbone.input_embeddings(), batches, target=1, length=2,
                                    vocabulary=vocabulary, init_id=5, iterations=1, candidates=2)
    on_cpu(trigger)
    assert trigger.shape == (2,)


# ---- theory tools ------------------------------------------------------------------------------------------------


def test_pontryagin_tools_allocate_nothing_on_the_default_device():
    from deltactl.theory import MSA, MSAConfig, linearised_step, model_system, state_gradients, trainable_controls

    model = tiny_t5(dtype=torch.float32)
    perturb(dc.attach(model, "lora", r=2))
    perturb(dc.attach(model, "prompt", length=2), seed=1)
    model.eval()
    batch = {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}
    with off_the_default_device():
        system = model_system(model, batch)
        controls = trainable_controls(model)
        view = system.costates(controls)
        step = linearised_step(system, controls, proximal=5.0)
        grads = state_gradients(model, batch)
        info = MSA(dict(model.named_parameters()), MSAConfig(rho=0.5, proximal=1.0)).step(system)
    on_cpu(view.objective, *view.costates.values(), *step.values(), *grads.values())
    assert all(isinstance(v, float) for v in info.values())


def test_jacobians_and_geometry_allocate_nothing_on_the_default_device():
    from deltactl.theory import (
        JacobianOperator,
        acting_controls,
        effective_update,
        output_map,
        principal_angles,
        randomized_svd,
        site_io,
        site_law,
        tangent_dimension,
        trainable_controls,
    )

    model = tiny_bert(dtype=torch.float32)
    delta = dc.attach(model, "lora", r=2)
    perturb(delta)
    batch = tiny_bert_batch()
    fn = output_map(model, batch, lambda m, b: m(**b).logits)
    controls = trainable_controls(model)
    with off_the_default_device():
        for mode in ("vjp", "jvp"):
            spec = randomized_svd(JacobianOperator(fn, controls, mode), 4, power=1)
        acting = acting_controls(fn, controls)
        rank, n = tangent_dimension(fn, controls)
        x, y = site_io(model, batch, "encoder.0.attn.q")
        dWx, dWy = effective_update(site_law(delta, "encoder.0.attn.q"), x, y)
        angles = principal_angles(dWx, dWx.T[:, :0])
    on_cpu(spec.values, *acting.values(), dWx, dWy, angles)
    assert 0 < rank <= n and angles.numel() == 0


def test_lq_reference_allocates_nothing_on_the_default_device():
    from deltactl.theory import LQProblem, riccati

    problem = LQProblem.random()
    with off_the_default_device():
        controls = problem.controls(0.5)
        view = problem.system().costates(controls)
        optimum, cost = riccati(problem)
    on_cpu(view.objective, *controls.values(), *optimum.values(), cost)
