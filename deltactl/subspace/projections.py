"""Random projections P: ℝ^d → ℝ^D for subspace training, δ = δ₀ + P z (Li et al., ICLR 2018; Aghajanyan et al.,
ACL 2021). Each is a linear nn.Module ``P(z) -> (D,)`` whose random factors are buffers drawn from a seed (not
saved: the seed regenerates them), so the trainable state is z alone.

- ``DenseProjection``: P with i.i.d. Gaussian entries, each column scaled to unit norm (d·D floats: small D only).
- ``SparseProjection``: ``per_column`` random rows of ±1 per column (Li et al.'s sparse variant; default
  ⌈√D⌉ non-zeros, the "very sparse" density 1/√D of Li, Hastie & Church 2006), each column then scaled to unit norm.
- ``FastfoodProjection``: P = S H G Π H B (Le, Sarlós & Smola, ICML 2013), never materialised; see its docstring.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltactl.subspace.fwht import fwht


def _check(d: int, D: int) -> None:
    if not (isinstance(d, int) and isinstance(D, int)) or d < 1 or D < 1:
        raise ValueError(f"a projection needs integer sizes d ≥ 1 and D ≥ 1, got d={d!r}, D={D!r}")


class Projection(nn.Module):
    """Base: a linear map ℝ^d → ℝ^D; ``matrix()`` materialises it (for tests and small sizes only)."""

    d: int
    D: int

    def matrix(self) -> torch.Tensor:
        """The D×d matrix, column by column (P e_j): O(d) applications, for checks on small sizes."""
        eye = torch.eye(self.d, dtype=self.dtype, device=self.device)
        return torch.stack([self(eye[j]) for j in range(self.d)], dim=1)

    def _normalise(self) -> None:
        """Rescale the factors so columns have unit norm (in expectation); idempotent, rerun after a dtype change."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        with torch.no_grad():
            self._normalise()  # in the new dtype, so a float64 copy has unit columns to float64 precision
        return self

    @property
    def dtype(self):
        return self.P.dtype

    @property
    def device(self):
        return next(self.buffers()).device

    def extra_repr(self) -> str:
        return f"d={self.d}, D={self.D}"


class DenseProjection(Projection):
    """P z with P a dense D×d Gaussian matrix whose columns have unit norm (memory d·D: small D only)."""

    def __init__(self, d: int, D: int, seed: int = 0):
        super().__init__()
        _check(d, D)
        self.d, self.D = d, D
        g = torch.Generator().manual_seed(seed)
        P = torch.randn(D, d, generator=g)
        self.register_buffer("P", P, persistent=False)
        self._normalise()

    def _normalise(self):
        self.P /= self.P.norm(dim=0, keepdim=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.P @ z.to(self.P.dtype)


class SparseProjection(Projection):
    """P z with a sparse P: ``per_column`` random rows per column, signs ±1, columns scaled to unit norm exactly."""

    def __init__(self, d: int, D: int, seed: int = 0, per_column: int | None = None):
        super().__init__()
        _check(d, D)
        self.d, self.D = d, D
        k = per_column or math.ceil(math.sqrt(D))
        if not 1 <= k <= D:
            raise ValueError(f"per_column must be in 1..D={D}, got {k}")
        g = torch.Generator().manual_seed(seed)
        rows = torch.randint(D, (d, k), generator=g).flatten()
        cols = torch.arange(d).repeat_interleave(k)
        signs = torch.randint(2, (d * k,), generator=g).float() * 2 - 1
        # coalesce() sums repeated (row, column) draws
        P = torch.sparse_coo_tensor(torch.stack([rows, cols]), signs, (D, d), check_invariants=True).coalesce()
        self.register_buffer("P", P, persistent=False)
        self._normalise()

    def _normalise(self):
        values, cols = self.P.values(), self.P.indices()[1]
        norms = torch.zeros(self.d, dtype=values.dtype, device=values.device).index_add_(0, cols, values**2).sqrt()
        values /= norms[cols]  # every column exactly unit norm, repeated draws included

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.P, z.to(self.P.dtype).unsqueeze(1)).squeeze(1)


class _Permute(torch.autograd.Function):
    """y = x[perm] for a permutation: the backward is the gather with the inverse permutation (exact, and a gather
    is several times cheaper than the scatter-add that index_select's generic backward runs)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, perm, inverse):
        return x.index_select(-1, perm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.perm, ctx.inverse = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx, grad):
        return _Permute.apply(grad, ctx.inverse, ctx.perm), None, None

    @staticmethod
    def jvp(ctx, tangent, *_):
        return _Permute.apply(tangent, ctx.perm, ctx.inverse)


class FastfoodProjection(Projection):
    """P z = S H G Π H B pad(z), stacked in blocks, without ever forming the D×d matrix.

    z ∈ ℝ^d is zero-padded to n = 2^⌈log2 max(d, block)⌉; each of L = ⌈D / n⌉ independent blocks applies
    B (random ±1 diagonal), H (Walsh–Hadamard, ``fwht``), Π (a random permutation), G (Gaussian diagonal) and H
    again; the blocks are concatenated and cut to D rows. Column j of one block has squared norm n·‖G‖² exactly
    (H B e_j is a ±1 vector, Π keeps it so, and ‖H u‖² = n‖u‖²), and each entry has E[entry²] = ‖G‖² over the
    signs; the block is divided by √(D·‖G_b‖²), so E‖P e_j‖² = 1, and when n divides D (D a power of two ≥ n)
    every column has norm exactly 1. Cost O(D log n) time and O(D) memory per application; the backward is the
    same transform transposed (exact, through ``fwht``'s autograd).

    Args:
        d: the subspace dimension; D: the output dimension; seed: draws B, Π, G.
        block: the smallest block size (a larger n mixes more; default: n is the next power of two ≥ d).
        kernel: the ``fwht`` kernel, "radix" (default) or "butterfly".
    """

    def __init__(self, d: int, D: int, seed: int = 0, block: int = 1, kernel: str = "radix"):
        super().__init__()
        _check(d, D)
        self.d, self.D, self.kernel = d, D, kernel
        self.n = 1 << max(0, (max(d, block) - 1).bit_length())
        self.blocks = -(-D // self.n)
        g = torch.Generator().manual_seed(seed)
        shape = (self.blocks, self.n)
        B = torch.randint(2, shape, generator=g).float() * 2 - 1
        # One permutation per block, as flat indices into the (L, n) array (int32 saves memory at large D).
        perm = torch.argsort(torch.rand(shape, generator=g), dim=1)
        perm = (perm + self.n * torch.arange(self.blocks).unsqueeze(1)).flatten().to(torch.int32)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        inverse = torch.empty_like(perm).scatter_(0, perm.long(), torch.arange(perm.numel(), dtype=torch.int32))
        self.register_buffer("inverse", inverse, persistent=False)
        self.register_buffer("G", torch.randn(shape, generator=g), persistent=False)
        self._normalise()

    def _normalise(self):
        self.G /= torch.sqrt(self.D * (self.G**2).sum(dim=1, keepdim=True))  # the 1/√(D‖G_b‖²) folded into G

    @property
    def dtype(self):
        return self.G.dtype

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape != (self.d,):
            raise ValueError(f"z must have shape ({self.d},), got {tuple(z.shape)}")
        x = torch.nn.functional.pad(z.to(self.B.dtype), (0, self.n - self.d))
        x = fwht(self.B * x, self.kernel)  # (L, n): the padded z broadcast over the blocks, signs flipped per block
        x = _Permute.apply(x.flatten(), self.perm, self.inverse).view(self.blocks, self.n)
        x = fwht(self.G * x, self.kernel)
        return x.flatten()[: self.D]


PROJECTIONS = {"dense": DenseProjection, "sparse": SparseProjection, "fastfood": FastfoodProjection}


def make_projection(kind: str, d: int, D: int, seed: int = 0, **options) -> Projection:
    """The projection ``kind`` ("dense", "sparse" or "fastfood") from ℝ^d to ℝ^D."""
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection {kind!r}; use one of {', '.join(PROJECTIONS)}")
    return PROJECTIONS[kind](d, D, seed=seed, **options)
