"""The fast Walsh–Hadamard transform and the projections P: ℝ^d → ℝ^D, against dense references in float64."""

import math

import pytest
import torch
from scipy.linalg import hadamard
from torch.autograd import gradcheck, gradgradcheck
from torch.func import jvp, vmap

from deltactl.subspace import DenseProjection, FastfoodProjection, SparseProjection, fwht, make_projection
from deltactl.subspace.fwht import fwht_reference

PROJECTIONS = ["dense", "sparse", "fastfood"]


def H(n):
    return torch.tensor(hadamard(n), dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 512])
def test_fwht_equals_the_hadamard_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ H(n), atol=1e-12 * n, rtol=0)
    torch.testing.assert_close(fwht(x[0, 0]), H(n) @ x[0, 0], atol=1e-12 * n, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 32, 64, 2048])
@pytest.mark.parametrize("kernel", ["radix", "butterfly"])
def test_both_kernels_equal_the_hadamard_matrix(n, kernel):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht_reference(x, kernel), x @ H(n), atol=1e-12 * n, rtol=0)


@pytest.mark.parametrize("n", [2, 16, 256])
def test_hadamard_squared_is_n_identity(n):
    eye = torch.eye(n, dtype=torch.float64)
    Hn = fwht(eye)  # rows H e_i: the matrix itself (symmetric)
    assert torch.equal(Hn, H(n))
    torch.testing.assert_close(fwht(Hn), n * eye, atol=0, rtol=0)


def test_fwht_leaves_its_input_alone_and_refuses_other_lengths():
    x = torch.randn(8, dtype=torch.float64)
    kept = x.clone()
    fwht(x)
    assert torch.equal(x, kept)
    for n in (0, 3, 12):
        with pytest.raises(ValueError, match="power of two"):
            fwht(torch.zeros(n))
    with pytest.raises(ValueError, match="kernel"):
        fwht(x, "fft")


@pytest.mark.parametrize("kernel", ["radix", "butterfly"])
def test_fwht_gradients_are_exact(kernel):
    x = torch.randn(1, 64, dtype=torch.float64, requires_grad=True)  # 64 = 32 · 2: two radix stages
    assert gradcheck(lambda v: fwht(v, kernel), (x,))
    assert gradgradcheck(lambda v: fwht(v, kernel), (x[:, :8].detach().requires_grad_(),))
    g = torch.randn(1, 64, dtype=torch.float64)
    (fwht(x, kernel) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ H(64).T, atol=1e-12, rtol=0)  # no 1/n factor


def test_fwht_under_torch_func():
    x, t = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    out, tangent = jvp(fwht, (x,), (t,))
    torch.testing.assert_close(tangent, t @ H(8), atol=1e-12, rtol=0)
    torch.testing.assert_close(vmap(fwht)(x), x @ H(8), atol=1e-12, rtol=0)


def fastfood_dense(P: FastfoodProjection) -> torch.Tensor:
    """The same map built as explicit matrices S H G Π H B (padding and cut as row/column selections)."""
    n, d = P.n, P.d
    blocks = []
    perm = P.perm.long().view(P.blocks, n) - n * torch.arange(P.blocks).unsqueeze(1)
    for b in range(P.blocks):
        Pi = torch.eye(n, dtype=torch.float64)[perm[b]]
        block = H(n) @ torch.diag(P.G[b]) @ Pi @ H(n) @ torch.diag(P.B[b])
        blocks.append(block[:, :d])
    return torch.cat(blocks)[: P.D]


@pytest.mark.parametrize("d,D", [(5, 64), (8, 8), (10, 100), (16, 40), (7, 3), (1, 1)])
@pytest.mark.parametrize("kernel", ["radix", "butterfly"])
def test_fastfood_equals_its_dense_matrix_forward_and_backward(d, D, kernel):
    P = FastfoodProjection(d, D, seed=3, kernel=kernel).double()
    M = fastfood_dense(P)
    z = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y = P(z)
    torch.testing.assert_close(y, M @ z.detach(), atol=1e-12, rtol=0)
    g = torch.randn(D, dtype=torch.float64)
    (y * g).sum().backward()
    torch.testing.assert_close(z.grad, M.T @ g, atol=1e-12, rtol=0)
    torch.testing.assert_close(P.matrix(), M, atol=1e-12, rtol=0)


@pytest.mark.parametrize("d,D", [(5, 64), (16, 16), (10, 32), (3, 1024), (100, 128)])
def test_fastfood_columns_have_unit_norm_when_D_is_a_power_of_two(d, D):
    M = FastfoodProjection(d, D, seed=1).double().matrix()
    torch.testing.assert_close(M.norm(dim=0), torch.ones(d, dtype=torch.float64), atol=1e-12, rtol=0)


def test_fastfood_columns_have_unit_norm_in_expectation_otherwise():
    d, D = 6, 40  # n = 8, five blocks: D is no power of two … and 24: the last block is cut
    for D in (40, 24, 5):
        sq = torch.stack([FastfoodProjection(d, D, seed=s).double().matrix().pow(2).sum(0) for s in range(150)])
        assert abs(sq.mean().item() - 1) < 0.07, (D, sq.mean())
    assert not torch.allclose(sq, torch.ones_like(sq))  # … so individual columns are not exactly unit


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_projection_is_linear_with_unit_columns_and_exact_gradients(kind):
    d, D = 6, 50
    P = make_projection(kind, d, D, seed=2).double()
    x, y = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(P(2.5 * x - 0.7 * y), 2.5 * P(x) - 0.7 * P(y), atol=1e-12, rtol=0)
    assert torch.equal(P(torch.zeros(d, dtype=torch.float64)), torch.zeros(D, dtype=torch.float64))
    M = P.matrix()
    assert M.shape == (D, d)
    torch.testing.assert_close(P(x), M @ x, atol=1e-12, rtol=0)
    if kind != "fastfood":  # Fastfood: exact only when D is a multiple of its block (tested above)
        torch.testing.assert_close(M.norm(dim=0), torch.ones(d, dtype=torch.float64), atol=1e-12, rtol=0)
    z = torch.randn(d, dtype=torch.float64, requires_grad=True)
    assert gradcheck(P, (z,))


@pytest.mark.parametrize("kind", PROJECTIONS)
def test_projection_is_a_function_of_the_seed(kind):
    a, b = make_projection(kind, 4, 30, seed=0), make_projection(kind, 4, 30, seed=0)
    c = make_projection(kind, 4, 30, seed=1)
    z = torch.randn(4)
    assert torch.equal(a(z), b(z)) and not torch.equal(a(z), c(z))
    assert a.state_dict() == {} or all(v.numel() == 0 for v in a.state_dict().values())  # nothing to save


def test_sparse_density_and_dense_shape():
    P = SparseProjection(10, 10_000, seed=0)
    nnz = P.P.coalesce().values().numel()
    assert 10 * 90 <= nnz <= 10 * 100  # ⌈√D⌉ = 100 draws per column, a few repeats merged
    assert DenseProjection(3, 7).P.shape == (7, 3)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="d ≥ 1"):
        make_projection("fastfood", 0, 10)
    with pytest.raises(ValueError, match="unknown projection"):
        make_projection("hadamard", 2, 10)
    with pytest.raises(ValueError, match="shape"):
        FastfoodProjection(4, 10)(torch.zeros(5))
    with pytest.raises(ValueError, match="per_column"):
        SparseProjection(2, 10, per_column=11)


def test_fastfood_block_option_and_sizes():
    P = FastfoodProjection(3, 1000, block=64)
    assert (P.n, P.blocks) == (64, math.ceil(1000 / 64))
    assert P(torch.randn(3)).shape == (1000,)
