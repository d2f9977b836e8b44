"""MSA, matrix-free Jacobians and subspace geometry against exact references (float64)."""

import numpy
import pytest
import scipy.linalg
import torch
from conftest import tiny_batch, tiny_bert, tiny_bert_batch, tiny_t5
from test_conformance import config, perturb
from torch.func import jacrev

import deltactl as dc
from deltactl.theory.geometry import (
    column_basis,
    effective_update,
    principal_angles,
    site_io,
    site_law,
    tangent_dimension,
)
from deltactl.theory.lq import LQProblem, riccati
from deltactl.theory.model import call_with, model_system, trainable_controls
from deltactl.theory.msa import MSA, MSAConfig, augmented_hamiltonian, linearised_step
from deltactl.theory.reachability import (
    JacobianOperator,
    flatten,
    numerical_rank,
    output_map,
    randomized_svd,
    spectrum,
    stage_map,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (conftest)


def t5_with(method, seed=0, attention="eager", **options):
    model = tiny_t5(attn_implementation=attention)
    delta = dc.attach(model, config(method, **options))
    perturb(delta, seed=seed)
    return model.eval(), delta, {**tiny_batch(), "labels": tiny_batch()["decoder_input_ids"]}


# ---- MSA --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_linearised_msa_step_is_a_gradient_step(method, attention):
    model, _, batch = t5_with(method, attention=attention)
    controls = trainable_controls(model)
    step = linearised_step(model_system(model, batch), controls, proximal=5.0)
    model(**batch).loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(step[name], p.detach() - p.grad / 5.0, atol=1e-14, rtol=0)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_one_inner_sgd_step_of_basic_msa_is_sgd(attention):
    model, _, batch = t5_with("lora", attention=attention)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(**batch).loss.backward()
    expected = {n: p.detach() - 0.1 * p.grad for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    msa = MSA(dict(model.named_parameters()), MSAConfig(lr=0.1, inner_steps=1, optimizer="sgd"))
    info = msa.step(model_system(model, batch))
    assert info["objective"] == pytest.approx(model_system(model, batch).forward(before)[1].item(), rel=1e-13)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), expected[n], atol=1e-14, rtol=0)


def test_emsa_penalties_vanish_at_the_anchor_and_grow_away_from_it():
    problem = LQProblem.random(n=3, m=2, horizon=4, seed=2)
    system = problem.system()
    anchor = problem.controls(0.1)
    view = system.costates(anchor)
    params = {k: v.clone().requires_grad_() for k, v in anchor.items()}
    plain = augmented_hamiltonian(system, view, params, anchor)
    extended = augmented_hamiltonian(system, view, params, anchor, rho=3.0, proximal=2.0)
    assert extended.item() == pytest.approx(plain.item(), abs=1e-13)
    g_plain = torch.autograd.grad(plain, list(params.values()))
    g_ext = torch.autograd.grad(extended, list(params.values()))
    for a, b in zip(g_plain, g_ext):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=0)
    moved = {k: (v + 0.5).requires_grad_() for k, v in anchor.items()}
    gap = augmented_hamiltonian(system, view, moved, anchor) - augmented_hamiltonian(system, view, moved, anchor, 3.0)
    assert gap.item() > 1e-3  # infeasible forward/backward equations are penalised


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_msa_reaches_the_riccati_optimum(rho):
    problem = LQProblem.random(n=3, m=1, horizon=5, seed=3)
    u_star, j_star = riccati(problem)
    params = {k: torch.nn.Parameter(v) for k, v in problem.controls().items()}
    msa = MSA(params, MSAConfig(lr=0.3, inner_steps=2, rho=rho, proximal=2.0, optimizer="sgd"))
    system = problem.system()
    for _ in range(150):
        msa.step(system)
    assert system.forward(params)[1].item() == pytest.approx(j_star.item(), rel=1e-10)
    for k in params:
        torch.testing.assert_close(params[k].detach(), u_star[k], atol=1e-8, rtol=0)


def test_proximal_term_is_minus_half_c_times_the_squared_distance_to_the_anchor():
    """M_c(δ) = M_0(δ) − (c/2) ‖δ − δ_k‖² and ∇M_c = ∇M_0 − c (δ − δ_k), in closed form (ρ = 0): the proximal term
    penalises leaving the anchor δ_k. Rules out a proximal term with the wrong sign (one that rewards distance)."""
    problem = LQProblem.random(n=3, m=2, horizon=4, seed=4)
    system = problem.system()
    anchor = problem.controls(0.1)
    view = system.costates(anchor)
    g = torch.Generator().manual_seed(7)
    moved = {k: (v + torch.randn(v.shape, generator=g, dtype=v.dtype)).requires_grad_() for k, v in anchor.items()}
    c = 2.5
    plain = augmented_hamiltonian(system, view, moved, anchor)
    proximal = augmented_hamiltonian(system, view, moved, anchor, proximal=c)
    distance = sum(float(((moved[k].detach() - anchor[k]) ** 2).sum()) for k in anchor)
    assert distance > 1.0
    assert proximal.item() - plain.item() == pytest.approx(-0.5 * c * distance, rel=1e-12)
    g_plain = torch.autograd.grad(plain, list(moved.values()))
    g_prox = torch.autograd.grad(proximal, list(moved.values()))
    for k, a, b in zip(moved, g_plain, g_prox):
        torch.testing.assert_close(b, a - c * (moved[k].detach() - anchor[k]), atol=1e-13, rtol=0)


def test_msa_config_errors():
    with pytest.raises(ValueError, match="must be 'adam' or 'sgd'"):
        MSAConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="inner_steps ≥ 1"):
        MSAConfig(inner_steps=0)
    with pytest.raises(ValueError, match="proximal weight c > 0"):
        linearised_step(LQProblem.random().system(), LQProblem.random().controls(), 0.0)


# ---- Jacobians ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_jacobian_products_match_the_dense_jacobian(mode):
    model = tiny_bert()  # BERT's LayerNorm stays in float64, so forward mode is exact too
    delta = dc.attach(model, config("lora"))
    perturb(delta)
    model.eval()
    fn = output_map(model, tiny_bert_batch(), lambda m, b: m(**b).logits)
    op = JacobianOperator(fn, trainable_controls(model), mode)
    z, unflatten = flatten(trainable_controls(model))
    dense = jacrev(lambda v: fn(unflatten(v)).reshape(-1))(z)
    g = torch.Generator().manual_seed(0)
    V = torch.randn(op.shape[1], 4, generator=g, dtype=torch.float64)
    U = torch.randn(op.shape[0], 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), dense @ V, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(op.rmatmat(U), dense.T @ U, atol=1e-12, rtol=1e-10)
    exact = torch.linalg.svdvals(dense)
    spec = randomized_svd(op, min(op.shape))
    torch.testing.assert_close(spec.values, exact, atol=1e-10 * exact[0], rtol=0)
    assert spec.rank == numerical_rank(exact, spec.rtol) and not spec.saturated


def test_randomized_svd_finds_a_known_low_rank_spectrum():
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=torch.float64))[0]
    sigma = torch.tensor([5.0, 3.0, 2.0, 1e-3, 1e-9], dtype=torch.float64)
    M = U @ torch.diag(sigma) @ V.T
    spec = spectrum(lambda c: M @ c["x"], {"x": torch.zeros(30, dtype=torch.float64)}, k=8, power=2)
    torch.testing.assert_close(spec.values[:5], sigma, atol=1e-12, rtol=0)
    assert spec.rank == 4  # 1e-9 / 5 is below the float64 tolerance 1e-6
    assert spectrum(lambda c: M @ c["x"], {"x": torch.zeros(30, dtype=torch.float64)}, k=2, oversample=0).saturated
    with pytest.raises(ValueError, match="at least one control"):
        JacobianOperator(lambda c: torch.zeros(3), {})


def test_stage_jacobians_see_where_a_control_acts():
    model, _, batch = t5_with("prompt")
    system = model_system(model, batch)
    controls = trainable_controls(model)
    assert spectrum(stage_map(system, "encoder.1", controls), controls, k=4).rank == 0  # prompts act on h⁽⁰⁾ only
    assert spectrum(stage_map(system, "encoder.embed", controls), controls, k=4).rank == 4
    with pytest.raises(ValueError, match="no stage 'encoder.9'"):
        stage_map(system, "encoder.9", controls)


# ---- geometry -----------------------------------------------------------------------------------------------------


def test_effective_update_of_lora_is_scaled_BA_with_rank_r():
    model, delta, batch = t5_with("lora", r=2)
    site = "decoder.1.attn.v"
    x, y = site_io(model, batch, site)
    dWx, dWy = effective_update(site_law(delta, site), x, y)
    layer = delta.controller.layers[site.replace(".", "__")]
    torch.testing.assert_close(dWx, (layer.scale * layer.B @ layer.A).detach(), atol=1e-14, rtol=0)
    assert dWy.abs().max() == 0
    assert numerical_rank(torch.linalg.svdvals(dWx), 1e-10) == 2


def test_effective_update_of_ia3_at_its_output_sites_and_refused_at_its_input_sites():
    """IA3 at the value projection: G(x, y) = l ⊙ y, so ΔW_x = 0 and ΔW_y = diag(l) − I exactly. At ``ffn.wo`` the law
    scales the layer's input (x' = l ⊙ x): G(x, y) − y is not the layer's update there (its update is W diag(l) − W,
    and l ⊙ x has d_ff entries against y's d_model), so ``site_law`` refuses it instead of handing out a law whose
    effective update would be a shape error, or wrong where d_in = d_out."""
    model, delta, batch = t5_with("ia3")
    site = "decoder.1.attn.v"
    x, y = site_io(model, batch, site)
    dWx, dWy = effective_update(site_law(delta, site), x, y)
    scale = delta.controller.layers[site.replace(".", "__")].l.detach()
    assert dWx.abs().max() == 0
    torch.testing.assert_close(dWy, torch.diag(scale) - torch.eye(len(scale), dtype=scale.dtype), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="acts on the layer's input"):
        site_law(delta, "encoder.0.ffn.wo")


def test_effective_update_of_an_adapter_is_its_linearisation_on_bert():
    model = tiny_bert()
    delta = dc.attach(model, config("adapter"))
    perturb(delta)
    model.eval()
    site = "encoder.1.ffn.out"
    x, y = site_io(model, tiny_bert_batch(), site)
    dWx, dWy = effective_update(site_law(delta, site), x, y)
    layer = delta.controller.layers[site.replace(".", "__")]
    with torch.no_grad():
        pre = y @ layer.down.weight.T + layer.down.bias  # relu': 1 where the bottleneck is active
        expected = torch.stack([layer.up.weight @ torch.diag((p > 0).double()) @ layer.down.weight for p in pre])
    torch.testing.assert_close(dWy, expected.mean(0), atol=1e-14, rtol=0)
    assert dWx.abs().max() == 0
    with pytest.raises(ValueError, match="does not act at"):
        site_law(delta, "encoder.0.attn.q")


def test_principal_angles_match_scipy():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(12, 3, generator=g, dtype=torch.float64)
    B = torch.randn(12, 5, generator=g, dtype=torch.float64)
    expected = torch.tensor(scipy.linalg.subspace_angles(A.numpy(), B.numpy())).sort().values
    torch.testing.assert_close(principal_angles(A, B), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(principal_angles(A, A @ torch.randn(3, 3, generator=g, dtype=torch.float64)),
                               torch.zeros(3, dtype=torch.float64), atol=1e-7, rtol=0)
    E = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(principal_angles(E[:, :2], E[:, 2:]), torch.full((2,), torch.pi / 2,
                                                                                  dtype=torch.float64))
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(A, B[:5])


def test_principal_angles_of_rank_deficient_matrices_match_scipy():
    """A (12 × 4) of rank 2: its column space is 2-dimensional, so it has exactly min(2, 3) = 2 principal angles to a
    generic 3-dimensional B, those of scipy.linalg.subspace_angles between an orthonormal basis of range(A)
    (scipy.linalg.orth) and B; column_basis(A) spans range(A): U Uᵀ equals the orthogonal projector onto it.
    Rules out a basis one column wider than the numerical rank (a spurious direction and an extra angle)."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 4, generator=g, dtype=torch.float64)
    B = torch.randn(12, 3, generator=g, dtype=torch.float64)
    orth = scipy.linalg.orth(A.numpy())
    assert orth.shape == (12, 2)
    U = column_basis(A)
    assert U.shape == (12, 2)
    torch.testing.assert_close(U @ U.T, torch.from_numpy(orth @ orth.T), atol=1e-12, rtol=0)
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
    expected = torch.tensor(scipy.linalg.subspace_angles(orth, B.numpy())).sort().values
    angles = principal_angles(A, B)
    assert angles.shape == (2,)
    torch.testing.assert_close(angles, expected, atol=1e-12, rtol=0)
    # range(A) inside range([A, B]): every angle is 0, one per dimension of range(A)
    torch.testing.assert_close(principal_angles(A, torch.cat([A, B], 1)), torch.zeros(2, dtype=torch.float64),
                               atol=1e-7, rtol=0)


@pytest.mark.parametrize("scale", [1.0, 1e-9, 1e9])
def test_numerical_rank_is_relative_to_the_largest_singular_value(scale):
    """rank_rtol(M) = #{σ_i > rtol · σ_1}: invariant under M → s M, and equal to numpy.linalg.matrix_rank with the
    tolerance rtol · σ_1. Rules out an absolute tolerance (σ_i > rtol), which makes the rank depend on the scale."""
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(20, 5, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(15, 5, generator=g, dtype=torch.float64))[0]
    sigma = torch.tensor([5.0, 3.0, 2.0, 1e-3, 1e-9], dtype=torch.float64) * scale
    M = U @ torch.diag(sigma) @ V.T
    rtol = 1e-6
    reference = int(numpy.linalg.matrix_rank(M.numpy(), tol=rtol * float(sigma[0])))
    assert reference == 4  # 1e-9 / 5 < 1e-6 ≤ 1e-3 / 5 at every scale
    assert numerical_rank(sigma, rtol) == reference
    assert numerical_rank(torch.linalg.svdvals(M), rtol) == reference
    spec = spectrum(lambda c: M @ c["x"], {"x": torch.zeros(15, dtype=torch.float64)}, rtol=rtol)
    assert spec.rank == reference
    assert column_basis(M, rtol).shape == (20, reference)
    assert column_basis(M).shape == (20, reference)  # the float64 default tolerance is 1e-6 too


@pytest.mark.parametrize("generic", [True, False])
def test_lora_tangent_dimension(generic):
    model = tiny_t5()
    site = "encoder.1.attn.o"  # d_in = heads·d_kv = 8, d_out = 16
    r = 3
    delta = dc.attach(model, config("lora", r=r, sites=(site,)))
    if generic:
        perturb(delta)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    y = torch.zeros(30, 16, dtype=torch.float64)
    law = site_law(delta, site)
    rank, n = tangent_dimension(lambda c: call_with(model, c, law, x, y), trainable_controls(model))
    # generic point: r(d_in + d_out) − r² of r(d_in + d_out); at initialisation (B = 0) A moves nothing and only
    # dB·A does: r·d_out of the r·d_out parameters of B
    assert (rank, n) == ((r * (8 + 16) - r * r, r * (8 + 16)) if generic else (r * 16, r * 16))
