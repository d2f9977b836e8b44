"""ReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models"; the pyreft library): a low-rank
edit of the residual stream h leaving chosen blocks, at chosen token positions only.

    LoReFT  φ(h) = h + Rᵀ(W h + b − R h),  R ∈ ℝ^{r×d} with orthonormal rows
    NoReFT  φ(h) = h + Rᵀ(W h + b − R h),  R free
    DiReFT  φ(h) = h + W₂ᵀ(W₁ h + b),      W₂ free (``orthogonal=True``: orthonormal rows, pyreft's
                                           DireftIntervention)

φ acts at the first ``first`` and the last ``last`` real tokens of each row (pyreft's "f{k}+l{k}"), counted over the
attention mask of the stack's pass, so padding on either side is skipped; every other position is left bit for bit.
The mask reaches the law through the backbone's ``see_tokens`` protocol (``deltactl.backbones.base``). With
``tied=False`` the first and the last positions get separate parameters (pyreft's ``share_weights=False``).

R's orthonormal rows are the Q factor of a free matrix X ∈ ℝ^{r×d} (Rᵀ = qr(Xᵀ).Q, signs fixed so that an
orthonormal X maps to itself): the set pyreft reaches with ``torch.nn.utils.parametrizations.orthogonal``, through a
map that is smooth at every X (torch's Householder map casts its diagonal to integers). ``init="pyreft"`` draws
X orthogonal and W, b as ``nn.Linear``; the zero control (``init="identity"``) sets W = R, b = 0 (DiReFT: W₁ = 0,
b = 0), so the edit starts at 0 as pyreft's ``LoreftIntervention_IdentityInit``. Dropout acts on φ(h) as pyreft's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltactl.control.attach import delta_dtype
from deltactl.control.controller import PerSite
from deltactl.control.registry import DeltaConfig, register

INITS = ("pyreft", "identity")


@dataclass(frozen=True)
class LoReFTConfig(DeltaConfig):
    """Args: r rank; first, last how many of the first and last real tokens of each row are edited; sites
    state-site patterns (default: every block output of the first stack, the encoder or a decoder-only model's
    decoder); layers block indices to keep among them (empty: all); tied one set of parameters for first and last
    positions (pyreft's share_weights); dropout on the edited states (train mode); init "pyreft" or "identity"."""

    method: ClassVar[str] = "loreft"
    small: ClassVar[dict] = {"r": 2, "first": 2, "last": 1}
    orthogonal: ClassVar[bool] = True
    subtract: ClassVar[bool] = True
    sites: tuple[str, ...] = ()
    r: int = 4
    first: int = 1
    last: int = 1
    layers: tuple[int, ...] = ()
    tied: bool = True
    dropout: float = 0.0
    init: str = "pyreft"

    def zero(self):
        return replace(self, init="identity")

    def site_patterns(self, sites):
        if self.sites:
            return self.sites
        stacks = [s.stack for s in sites.values() if s.kind == "state"]
        return (f"{'encoder' if 'encoder' in stacks else 'decoder'}.*.out",)


@dataclass(frozen=True)
class NoReFTConfig(LoReFTConfig):
    method: ClassVar[str] = "noreft"
    orthogonal: ClassVar[bool] = False


@dataclass(frozen=True)
class DiReFTConfig(LoReFTConfig):
    """DiReFT: as LoReFTConfig, plus orthogonal (W₂ with orthonormal rows, as pyreft's DireftIntervention)."""

    method: ClassVar[str] = "direft"
    subtract: ClassVar[bool] = False
    orthogonal: bool = False


def orthonormal_rows(X: torch.Tensor) -> torch.Tensor:
    """The r×d matrix with orthonormal rows spanning X's rows: Q of Xᵀ = QR, each column signed so diag(R) ≥ 0."""
    Q, R = torch.linalg.qr(X.mT)
    return (Q * torch.where(R.diagonal() >= 0, 1.0, -1.0).to(Q.dtype)).mT


class Intervention(nn.Module):
    """φ(h) − h = Rᵀ(W h + b − R h) (LoReFT, NoReFT) or Rᵀ(W h + b) (DiReFT) on a batch of states h."""

    def __init__(self, d: int, cfg: LoReFTConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.orthogonal, self.subtract = cfg.orthogonal, cfg.subtract
        self.R = nn.Parameter(torch.empty(cfg.r, d, dtype=dtype))  # X under the orthogonality constraint, else R
        self.source = nn.Linear(d, cfg.r, dtype=dtype)  # W h + b
        if self.orthogonal:
            nn.init.orthogonal_(self.R)
        else:  # pyreft's proj_layer: an nn.Linear(d, r) weight
            nn.init.kaiming_uniform_(self.R, a=5**0.5)
        if cfg.init == "identity":
            with torch.no_grad():
                self.source.weight.copy_(self.rotation() if self.subtract else torch.zeros_like(self.R))
                self.source.bias.zero_()

    def rotation(self) -> torch.Tensor:
        """R (r×d)."""
        return orthonormal_rows(self.R) if self.orthogonal else self.R

    def forward(self, h):
        R = self.rotation()
        W = self.source.weight - R if self.subtract else self.source.weight  # (W − R) h + b: 0 when W = R, b = 0
        return F.linear(F.linear(h, W, self.source.bias), R.mT)


class ReFTLayer(nn.Module):
    """The law at one block output: y ← φ(y) at the chosen positions, y elsewhere (bit for bit)."""

    def __init__(self, d: int, cfg: LoReFTConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.first, self.last = cfg.first, cfg.last
        parts = 1 if cfg.tied or not (cfg.first and cfg.last) else 2
        self.edits = nn.ModuleList(Intervention(d, cfg, dtype) for _ in range(parts))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None
        self.tokens = None  # (attention mask, cached length) of the stack's last pass, from see_tokens

    def see_tokens(self, mask, past):
        self.tokens = (mask, past)

    def positions(self, y) -> list[torch.Tensor] | None:
        """Boolean (batch, length) masks of the positions each edit acts on; None on a cached continuation."""
        if self.tokens is None:
            raise RuntimeError(
                "a ReFT law was called without the attention mask of its stack's pass: it is recorded by the hook "
                "attach installs with the law, so call the model (combine ReFT with chain, not sum or per_row)")
        mask, past = self.tokens
        batch, length = y.shape[:2]
        if past:  # decoding continues a cached sequence: pyreft edits the prompt's positions only
            return None
        if mask is None:
            real = torch.ones(batch, length, dtype=torch.bool, device=y.device)
        else:
            if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] > length:
                raise ValueError(f"ReFT reads a 2-D attention mask (batch, length) of the states' batch: got mask "
                                 f"{tuple(mask.shape)} for states {tuple(y.shape)}")
            real = mask.to(device=y.device).bool()
            if mask.shape[1] < length:  # rows placed before the tokens after the mask was read (a soft prompt)
                real = torch.cat([real.new_ones(batch, length - mask.shape[1]), real], dim=1)
        rank = real.cumsum(1) - 1  # index of each real token among its row's real tokens
        count = real.sum(1, keepdim=True)
        first, last = real & (rank < self.first), real & (rank >= count - self.last)
        return [first | last] if len(self.edits) == 1 else [first, last]

    def forward(self, x, y):
        chosen = self.positions(y)
        if chosen is None:
            return y
        out = y
        for edit, where in zip(self.edits, chosen):
            h = out.to(edit.R.dtype)
            new = h + edit(h)
            if self.dropout is not None:
                new = self.dropout(new)
            out = torch.where(where.unsqueeze(-1), new.to(y.dtype), out)
        return out


def chosen_sites(cfg, sites):
    if not cfg.layers:
        return list(sites)
    missing = sorted(set(cfg.layers) - {s.layer for s in sites})
    if missing:
        raise ValueError(f"{cfg.method} layers {missing} name no block among the sites "
                         f"{', '.join(s.name for s in sites)}")
    return [s for s in sites if s.layer in cfg.layers]


def build(cfg, backbone, sites):
    if cfg.r < 1:
        raise ValueError(f"{cfg.method} rank r must be ≥ 1, got {cfg.r}")
    if cfg.first < 0 or cfg.last < 0 or cfg.first + cfg.last == 0:
        raise ValueError(f"{cfg.method} acts on the first and last positions: first, last ≥ 0, not both 0; got "
                         f"first={cfg.first}, last={cfg.last}")
    if cfg.init not in INITS:
        raise ValueError(f"{cfg.method} init must be one of {', '.join(INITS)}; got {cfg.init!r}")
    if cfg.orthogonal and any(cfg.r > s.dims["d"] for s in sites):
        raise ValueError(f"{cfg.method}: r = {cfg.r} orthonormal rows do not fit in d = {sites[0].dims['d']}")
    sites = chosen_sites(cfg, sites)
    # Built in the dtype attach gives δ, so that W = R holds exactly after attach (R is recomputed from X in the
    # dtype it is used in): the identity init is then bit-exact.
    reference = next(p for p in backbone.model.parameters() if p.is_floating_point())
    dtype = delta_dtype(reference.dtype)
    return PerSite(cfg, sites, {s.name: ReFTLayer(s.dims["d"], cfg, dtype) for s in sites})


def count(cfg, sites):
    """2rd + r per edit (R, and W, b); two edits per block when first and last positions are not tied."""
    parts = 1 if cfg.tied or not (cfg.first and cfg.last) else 2
    return sum(parts * (2 * cfg.r * s.dims["d"] + cfg.r) for s in chosen_sites(cfg, sites))


for _config in (LoReFTConfig, NoReFTConfig, DiReFTConfig):
    register(_config, {"state"}, build, count)
