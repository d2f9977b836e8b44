"""LoRA (Hu et al., 2022): a low-rank update of a weight, y = W x + s B A x, s = α/r, with B = 0 at the start.

Options, each as PEFT's ``LoraConfig`` computes it:

- ``rslora`` (rank-stabilised LoRA, Kalajdzievski 2023): s = α/√r (PEFT's ``use_rslora``).
- ``init="pissa"`` (Meng et al., 2024) / ``init="olora"`` (Büyükakyüz, 2024) (PEFT's ``init_lora_weights``): A₀, B₀
  from the weight, PiSSA the top r singular triplets of W = V S Uᵀ (B₀ = V_r √(S_r/s), A₀ = √(S_r/s) U_rᵀ), OLoRA the
  first r columns of Q and rows of R in W = Q R. PEFT then replaces the frozen weight by W − s B₀A₀; deltactl
  leaves it untouched and keeps A₀, B₀ as buffers: the law is y = W x + s B A drop(x) − s B₀ A₀ x, i.e.
  ΔW = s (BA − B₀A₀), zero at the start, equal to PEFT's outputs, and detaching restores the model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register

INITS = ("default", "pissa", "olora")


@dataclass(frozen=True)
class LoRAConfig(DeltaConfig):
    """Args: r rank; alpha scale numerator (scale α/r, or α/√r with rslora); dropout on the LoRA input; rslora
    rank-stabilised scaling; init "default" (A as nn.Linear, B = 0), "pissa" or "olora" (A, B from the weight's SVD
    or QR, their initial product subtracted in the law); sites linear patterns."""

    method: ClassVar[str] = "lora"
    small: ClassVar[dict] = {"r": 2}
    sites: tuple[str, ...] = ("*.q", "*.v")
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"


def lora_scale(cfg) -> float:
    """s = α/r, or α/√r with rsLoRA (PEFT's ``scaling``)."""
    return cfg.alpha / math.sqrt(cfg.r) if cfg.rslora else cfg.alpha / cfg.r


def lora_update(x, A, B, scale):
    """s B A x for a batch of rows x."""
    return F.linear(F.linear(x, A), B) * scale


def site_weight(module: nn.Module, site) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight of a linear site laid out as nn.Linear's (out, in), and its bias (or None).

    GPT-2's Conv1D stores (in, out), and its q, k, v sites are row slices (``site.dims["slice"]``) of that layout.
    """
    W, b = module.weight, getattr(module, "bias", None)
    if not isinstance(module, nn.Linear):  # the backbones' other linear layer is GPT-2's Conv1D: y = x W + b
        W = W.T
    lo, hi = site.dims.get("slice", (0, W.shape[0]))
    return W[lo:hi], (None if b is None else b[lo:hi])


def initial_factors(W: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀, B₀) of PiSSA or OLoRA from a weight W (out, in), as PEFT's ``pissa_init``/``olora_init`` compute them:
    in float32 on a float32 or half-precision weight (PEFT's only dtypes), in float64 on a float64 one."""
    if r > min(W.shape):
        raise ValueError(f"LoRA init={init!r} takes r singular/QR directions of a {tuple(W.shape)} weight: "
                         f"r = {r} > {min(W.shape)}")
    W = W.detach().to(torch.promote_types(W.dtype, torch.float32))
    if init == "pissa":
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        root = torch.sqrt(S[:r] / scale)
        return torch.diag(root) @ Uh[:r], V[:, :r] @ torch.diag(root)
    Q, R = torch.linalg.qr(W)
    return R[:r].contiguous(), Q[:, :r].contiguous()


class LoRALayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, cfg: LoRAConfig, weight: torch.Tensor | None = None):
        super().__init__()
        self.scale = lora_scale(cfg)
        if cfg.init == "default":
            self.A = nn.Parameter(torch.empty(cfg.r, d_in))
            self.B = nn.Parameter(torch.zeros(d_out, cfg.r))
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear and PEFT initialise A
            self.register_buffer("A0", None)
            self.register_buffer("B0", None)
        else:
            A0, B0 = initial_factors(weight, cfg.r, self.scale, cfg.init)
            self.A, self.B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
            self.register_buffer("A0", A0)  # s B₀A₀ is what PEFT subtracts from the weight
            self.register_buffer("B0", B0)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None

    def forward(self, x, y):
        # In δ's dtype (float32 on a half base, as PEFT computes), rounded once to the layer's dtype.
        x = x.to(self.A.dtype)
        update = lora_update(x if self.dropout is None else self.dropout(x), self.A, self.B, self.scale)
        if self.A0 is not None:  # PEFT's residual weight W − s B₀A₀ sees the input without dropout
            update = update - lora_update(x, self.A0, self.B0, self.scale)
        return (y + update).to(y.dtype)

    def delta_weight(self):
        """ΔW = s (BA − B₀A₀), or s BA."""
        product = self.B @ self.A
        if self.A0 is not None:
            product = product - self.B0 @ self.A0
        return self.scale * product

    def weight_laws(self, site):
        return [("weight", lambda W: W + self.delta_weight())]  # W ← W + ΔW


def build(cfg, backbone, sites):
    if cfg.r < 1:
        raise ValueError(f"LoRA rank r must be ≥ 1, got {cfg.r}")
    if cfg.init not in INITS:
        raise ValueError(f"LoRA init must be one of {', '.join(INITS)}; got {cfg.init!r}")

    def weight(site):
        return None if cfg.init == "default" else site_weight(backbone.module(site), site)[0]

    return PerSite(cfg, sites, {s.name: LoRALayer(s.dims["in"], s.dims["out"], cfg, weight(s)) for s in sites})


def count(cfg, sites):
    return sum(cfg.r * (s.dims["in"] + s.dims["out"]) for s in sites)


register(LoRAConfig, {"linear"}, build, count)
