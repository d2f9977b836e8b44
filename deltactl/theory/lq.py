"""A linear–quadratic control problem with its Riccati closed form: the exact reference for the MSA solver.

    x_{t+1} = A x_t + B u_t,  x_0 given,
    J(u) = Σ_{t<T} ½ (x_tᵀ Q x_t + u_tᵀ R u_t) + ½ x_Tᵀ Q_f x_T.

Backward Riccati recursion (Q, Q_f ⪰ 0, R ≻ 0): P_T = Q_f, K_t = (R + BᵀP_{t+1}B)⁻¹ BᵀP_{t+1}A,
P_t = Q + AᵀP_{t+1}(A − B K_t); the optimal controls are u_t = −K_t x_t along the optimal trajectory and the
optimal cost is J* = ½ x_0ᵀ P_0 x_0 (Bertsekas, Dynamic Programming and Optimal Control, vol. I, §4.1).
J is strictly convex in u, so a stationary point of the maximum principle (∇_u H_t = 0 for every t) is this optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltactl.theory.system import ControlSystem, Stage


@dataclass(frozen=True)
class LQProblem:
    A: torch.Tensor
    B: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    Qf: torch.Tensor
    x0: torch.Tensor
    horizon: int

    @staticmethod
    def random(n: int = 4, m: int = 2, horizon: int = 8, seed: int = 0, dtype=torch.float64) -> "LQProblem":
        """A random stable-ish instance: ‖A‖₂ = 0.95, Q, Q_f ⪰ 0 and R ≻ 0 well conditioned."""
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(n, n, generator=g, dtype=dtype)
        A = 0.95 * A / torch.linalg.matrix_norm(A, 2)
        B = torch.randn(n, m, generator=g, dtype=dtype) / n**0.5
        C = torch.randn(n, n, generator=g, dtype=dtype) / n**0.5
        Q = C @ C.T
        R = torch.eye(m, dtype=dtype) * 0.5
        Qf = 2 * torch.eye(n, dtype=dtype)
        x0 = torch.randn(n, generator=g, dtype=dtype)
        return LQProblem(A, B, Q, R, Qf, x0, horizon)

    def controls(self, value: float = 0.0) -> dict[str, torch.Tensor]:
        """Per-stage controls ``u{t}``, all equal to ``value``."""
        m = self.B.shape[1]
        return {f"u{t}": torch.full((m,), value, dtype=self.A.dtype, device=self.A.device) for t in range(self.horizon)}

    def system(self) -> ControlSystem:
        """The problem as stages: x_0 (no control), then t = 0…T−1, then the terminal cost."""
        A, B, Q, R, Qf = self.A, self.B, self.Q, self.R, self.Qf
        stages = [Stage("x0", (), "x0", lambda c: self.x0)]
        for t in range(self.horizon):
            u = f"u{t}"
            stages.append(Stage(
                f"t{t}", (f"x{t}",), f"x{t + 1}",
                step=lambda c, x, u=u: A @ x + B @ c[u],
                cost=lambda c, x, u=u: 0.5 * (x @ Q @ x + c[u] @ R @ c[u]),
            ))
        stages.append(Stage("terminal", (f"x{self.horizon}",), None, lambda c, x: 0.5 * x @ Qf @ x))
        return ControlSystem(stages)


def riccati(problem: LQProblem) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The optimal open-loop controls {u{t}} from x_0 and the optimal cost J* = ½ x_0ᵀ P_0 x_0."""
    A, B, Q, R = problem.A, problem.B, problem.Q, problem.R
    P = problem.Qf
    gains = []
    for _ in range(problem.horizon):
        K = torch.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
        P = Q + A.T @ P @ (A - B @ K)
        gains.append(K)
    gains.reverse()
    x, controls = problem.x0, {}
    for t, K in enumerate(gains):
        controls[f"u{t}"] = -K @ x
        x = A @ x + B @ controls[f"u{t}"]
    return controls, 0.5 * problem.x0 @ P @ problem.x0
