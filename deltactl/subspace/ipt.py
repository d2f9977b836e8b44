"""Intrinsic prompt tuning (Qin et al., "Exploring universal intrinsic task subspace via prompt tuning", 2021/2024).

Stage 1 (multi-task subspace finding): soft prompts P_t ∈ ℝ^{p×h} trained per task are compressed by an
autoencoder, z = Proj(P) = W_d vec(P) ∈ ℝ^{d_I} and P̂ = Back(z) = reshape(W_2 tanh(W_1 z + b_1) + b_2), trained on
    L = Σ_t ℓ_t(P̂_t) + α ‖P̂_t − P_t‖²
(the task losses with the reconstructed prompts plus α times the reconstruction error).
Stage 2 (intrinsic subspace tuning): on a new task only z ∈ ℝ^{d_I} trains; the back-projection stays frozen and
the prompt is Back(z). ``IntrinsicPrompt`` wraps a model with an attached prompt controller so that its rows are
Back(z), applied functionally (the controller's own rows are never written).
"""

from __future__ import annotations

import torch
from torch import nn

from deltactl.subspace.functional import FunctionalDelta


class PromptAutoencoder(nn.Module):
    """Proj: ℝ^{p·h} → ℝ^{d_I} (linear) and Back: ℝ^{d_I} → ℝ^{hidden} → ℝ^{p·h} (through tanh).

    Args:
        length: prompt rows p; width: their size h; intrinsic: d_I; hidden: the back-projection's inner width.
    """

    def __init__(self, length: int, width: int, intrinsic: int, hidden: int):
        super().__init__()
        if min(length, width, intrinsic, hidden) < 1:
            raise ValueError(f"all sizes must be ≥ 1, got length={length}, width={width}, "
                             f"intrinsic={intrinsic}, hidden={hidden}")
        self.length, self.width = length, width
        self.down = nn.Linear(length * width, intrinsic)
        self.up = nn.Sequential(nn.Linear(intrinsic, hidden), nn.Tanh(), nn.Linear(hidden, length * width))

    def encode(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.down(prompt.reshape(*prompt.shape[:-2], -1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(z).view(*z.shape[:-1], self.length, self.width)

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(prompt))


class IntrinsicPrompt(FunctionalDelta):
    """A prompt controller's rows given by Back(z): only z ∈ ℝ^{d_I} trains (stage 2 of IPT).

    Args:
        model: the model the prompt delta is attached to (or one containing it); name: the prompt rows'
            parameter name in ``model`` (e.g. "bert.deltactl.prompt.layers.encoder__embed.rows").
        back: the frozen back-projection (a ``PromptAutoencoder``; only ``decode`` is used).
        z: the starting point (default zeros).
    """

    def __init__(self, model, name: str, back: PromptAutoencoder, z: torch.Tensor | None = None):
        super().__init__(model, [name])
        rows = self.base[name]
        if tuple(rows.shape) != (back.length, back.width):
            raise ValueError(f"the prompt {name!r} has shape {tuple(rows.shape)} but the autoencoder makes "
                             f"({back.length}, {back.width}) prompts")
        self.back = back.requires_grad_(False)
        start = torch.zeros(back.down.out_features, device=rows.device) if z is None else z.detach().clone()
        self.z = nn.Parameter(start.to(device=rows.device, dtype=rows.dtype))

    def values(self) -> dict:
        return {self.names[0]: self.back.decode(self.z)}
