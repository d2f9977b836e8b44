"""Subspace delta tuning: δ = δ₀ + P z with z ∈ ℝ^d trained, over any controller's δ or all weights of a model.

Projections (dense, sparse, Fastfood over an in-place fast Walsh–Hadamard transform), the DID and SAID wrappers
(Aghajanyan et al., ACL 2021), the d90 search (Li et al., ICLR 2018) and intrinsic prompt tuning (Qin et al.).
"""

from deltactl.subspace.d90 import D90Result, d90_from_curve, d90_search, plot_d90
from deltactl.subspace.functional import FunctionalDelta
from deltactl.subspace.fwht import fwht
from deltactl.subspace.intrinsic import ControllerSubspace, Subspace, intrinsic, subspace
from deltactl.subspace.ipt import IntrinsicPrompt, PromptAutoencoder
from deltactl.subspace.projections import (
    DenseProjection,
    FastfoodProjection,
    Projection,
    SparseProjection,
    make_projection,
)

__all__ = [
    "ControllerSubspace", "D90Result", "DenseProjection", "FastfoodProjection", "FunctionalDelta", "IntrinsicPrompt",
    "Projection", "PromptAutoencoder", "SparseProjection", "Subspace", "d90_from_curve", "d90_search", "fwht",
    "intrinsic", "make_projection", "plot_d90", "subspace",
]
