"""Inference-time controllers: δ re-optimised per test batch (or per decoding step) against a state cost.

- ``optimize``: the generic loop (free δ, a cost on the trajectory, a few optimiser steps, outputs, δ restored);
- ``truncated_rollout``: the bottom states of a stack, running only the blocks that produce them;
- ``RobustPrefix`` with ``fit_manifold``: robust prefix-tuning (Yang & Liu, ICLR 2022);
- ``bias_tuned_generate``: inference-time bias tuning for generation with adaptive redo (Yang et al., 2022, UDDIA).
"""

from deltactl.inference.bias_tuning import Generation, bias_tuned_generate, head_cost, token_set_cost, top_layer_biases
from deltactl.inference.loop import InferenceResult, free_parameters, optimize, preserved
from deltactl.inference.manifold import Subspace, canonical_subspace, pool
from deltactl.inference.robust_prefix import CanonicalManifold, RobustPrefix, fit_manifold, manifold_cost
from deltactl.inference.rollout import truncated_rollout

__all__ = [
    "Generation", "bias_tuned_generate", "head_cost", "token_set_cost", "top_layer_biases",
    "CanonicalManifold", "InferenceResult", "RobustPrefix", "Subspace", "canonical_subspace", "fit_manifold",
    "free_parameters", "manifold_cost", "optimize", "pool", "preserved", "truncated_rollout",
]
