"""Theory tools for delta tuning read as optimal control, generic over every registered controller.

- Pontryagin view: ``model_system`` (a T5 or BERT model with deltas → a ``ControlSystem`` of stages),
  ``ControlSystem.costates`` (p = −∂J/∂h, per-stage ∇_δ H_j), ``state_gradients`` (the autograd reference).
- Solvers: ``MSA`` / ``MSAConfig`` (Li, Chen, Tai & E, JMLR 2018: basic and extended MSA with a proximal term),
  ``linearised_step``; ``LQProblem`` and ``riccati`` (the exact linear–quadratic reference).
- Controllability: ``JacobianOperator`` (matrix-free ∂y/∂δ with torch.func), ``randomized_svd``, ``spectrum``,
  ``output_map``, ``stage_map``.
- Geometry: ``effective_update``, ``site_io``, ``site_law``, ``principal_angles``, ``tangent_dimension``.
- Statements: ``deltactl.theory.statements`` (``deltactl theory check``), one per file of theory/.
"""

from deltactl.theory.geometry import (
    acting_controls,
    column_basis,
    effective_update,
    principal_angles,
    site_io,
    site_law,
    tangent_dimension,
)
from deltactl.theory.lq import LQProblem, riccati
from deltactl.theory.model import call_with, default_loss, model_system, state_gradients, trainable_controls
from deltactl.theory.msa import MSA, MSAConfig, augmented_hamiltonian, linearised_step
from deltactl.theory.reachability import (
    JacobianOperator,
    Spectrum,
    flatten,
    numerical_rank,
    output_map,
    randomized_svd,
    spectrum,
    stage_map,
)
from deltactl.theory.system import ControlSystem, Costates, Stage

__all__ = [
    "MSA", "ControlSystem", "Costates", "JacobianOperator", "LQProblem", "MSAConfig", "Spectrum", "Stage",
    "acting_controls", "augmented_hamiltonian", "call_with", "column_basis", "default_loss", "effective_update",
    "flatten", "linearised_step", "model_system", "numerical_rank", "output_map", "principal_angles",
    "randomized_svd", "riccati", "site_io", "site_law", "spectrum", "stage_map", "state_gradients",
    "tangent_dimension", "trainable_controls",
]
