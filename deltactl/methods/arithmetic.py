"""Delta arithmetic: weighted combinations of trained deltas of one method (task vectors, adapter merging).

``combine(model, ["sst2", "mnli"], [0.7, 0.3])`` attaches a new delta and switches it on alone:

- ``how="linear"`` (any method): δ = δ_id + Σ wᵢ (δᵢ − δ_id), where δ_id is the method's identity control (0 for
  BitFit, LN-tuning, diff pruning, named and selective tuning; 1 for IA3's scales). For methods whose update of the
  weights is linear in δ this is task arithmetic on the weights, θ' − θ = Σ wᵢ (θᵢ' − θ); for adapters it is an
  average of parameters (weights must then sum to 1, since their identity control is not a fixed parameter value).
  For LoRA, "linear" is PEFT's: A = Σ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ, B = Σ √|wᵢsᵢ| Bᵢ (equal ranks; not Σ wᵢΔWᵢ, since the
  cross terms BᵢAⱼ remain).
- ``how="cat"`` (LoRA): A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …], rank Σ rᵢ, so ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ exactly.
- ``how="svd"`` (LoRA and its variants): ΔW = Σ wᵢ ΔWᵢ (each ΔWᵢ read off the delta's merge law), truncated to rank
  ``r`` (default: the largest rᵢ) by SVD: B = U_r S_r, A = V_rᵀ. Exact when r ≥ rank(ΔW).

The combined LoRA has α = r (scale 1), as PEFT's ``add_weighted_adapter`` makes it; all three match PEFT's
combination types of the same names on identical weights. ``negate(model, name)`` is the weight −1: the task vector
subtracted (−δ for additive methods, 2 − l for IA3's scales, −ΔW for LoRA).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from deltactl.control.attach import attach, build, use
from deltactl.control.controller import site_key
from deltactl.control.root import deltas

HOWS = ("linear", "cat", "svd")


def combine(model, names, weights, *, how: str = "linear", name: str | None = None, r: int | None = None):
    """Attach Σ wᵢ δᵢ of the deltas ``names`` (one method, the same sites) as a new delta, active alone; returns it."""
    parts = _deltas(model, names)
    weights = [float(w) for w in weights]
    if len(weights) != len(parts):
        raise ValueError(f"combine got {len(parts)} deltas and {len(weights)} weights; give one weight per delta")
    if how not in HOWS:
        raise ValueError(f"unknown combination {how!r}; choose one of {', '.join(HOWS)}")
    method = parts[0].config.method
    if any(p.config.method != method for p in parts):
        raise ValueError("combine needs deltas of one method, got " + ", ".join(
            f"{p.name} ({p.config.method})" for p in parts))
    sites = [s.name for s in parts[0].controller.sites]
    for p in parts[1:]:
        if [s.name for s in p.controller.sites] != sites:
            raise ValueError(f"delta {p.name!r} acts on other sites than {parts[0].name!r}; combine needs the same "
                             "sites")
    if how != "linear" and method != "lora":
        raise ValueError(f"combination {how!r} is for LoRA (low-rank weight updates); {method} combines 'linear'")
    name = name or _free(model, "_".join(p.name for p in parts) + f"_{how}")
    if how == "linear" and method != "lora":
        config, state = parts[0].config, _linear(model, parts, weights)
    elif how == "linear":
        config, state = _lora_linear(parts, weights)
    elif how == "cat":
        config, state = _lora_cat(parts, weights)
    else:
        config, state = _lora_svd(model, parts, weights, r)
    combined = attach(model, config, name=name)
    try:
        own = combined.controller.state_dict()
        combined.controller.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    except Exception:
        combined.detach()
        raise
    use(model, combined.name)
    return combined


def negate(model, name: str, *, new_name: str | None = None):
    """The task vector of delta ``name`` subtracted: weight −1 ("cat" for LoRA, "linear" otherwise), active alone."""
    how = "cat" if _deltas(model, [name])[0].config.method == "lora" else "linear"
    return combine(model, [name], [-1.0], how=how, name=new_name or _free(model, f"{name}_negated"))


def _free(model, base: str) -> str:
    taken, name, k = deltas(model), base, 1
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def _deltas(model, names):
    attached = deltas(model)
    if not names:
        raise ValueError("combine needs at least one delta name")
    unknown = [n for n in names if n not in attached]
    if unknown:
        raise ValueError(f"no delta named {unknown[0]!r} on this model; attached: {', '.join(attached) or 'none'}")
    return [attached[n] for n in names]


def _linear(model, parts, weights) -> dict:
    """δ_id + Σ wᵢ (δᵢ − δ_id), δ_id the parameters of the method's identity control on this model."""
    configs = {dataclasses.replace(p.config) for p in parts}
    if len(configs) > 1:
        raise ValueError("linear combination needs deltas with the same options; got " + "; ".join(
            f"{p.name}: {p.config}" for p in parts))
    config = parts[0].config
    identity = build(config.zero(), parts[0].backbone).state_dict()
    states = [p.controller.state_dict() for p in parts]
    total = sum(weights)
    combined = {}
    for key, base in identity.items():
        base = base.to(states[0][key].dtype)
        fixed = bool((base == base.reshape(-1)[0]).all()) if base.numel() else True
        if not math.isclose(total, 1.0, abs_tol=1e-9) and not fixed:
            raise ValueError(
                f"{config.method}'s identity control is not a fixed value of {key!r} (it is drawn at random), so its "
                f"weights must sum to 1 (they sum to {total:g}): a weighted average of the deltas' parameters"
            )
        combined[key] = base + sum(w * (s[key] - base) for w, s in zip(weights, states))
    return combined


def _plain(config, r: int):
    """The combined delta's config: a default-initialised LoRA of rank r with α = r (scale 1)."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {"r": r, "alpha": float(r)}
    changes.update({k: v for k, v in (("rslora", False), ("init", "default")) if k in fields})
    return dataclasses.replace(config, **changes)


def _check_default_lora(parts, how):
    for p in parts:
        init = getattr(p.config, "init", "default")
        if init != "default":
            raise ValueError(f"combination {how!r} reads A and B as a plain LoRA's; delta {p.name!r} has "
                             f"init={init!r} (its update is s(BA − B₀A₀)): use how='svd'")


def _lora_linear(parts, weights):
    _check_default_lora(parts, "linear")
    ranks = {p.config.r for p in parts}
    if len(ranks) > 1:
        raise ValueError(f"linear combination of LoRA needs equal ranks, got {sorted(ranks)}; use how='cat' or 'svd'")
    state = {}
    for site in parts[0].controller.sites:
        key = site_key(site.name)
        A = B = 0
        for p, w in zip(parts, weights):
            layer = p.controller.layers[key]
            ws = w * layer.scale
            A = A + math.copysign(math.sqrt(abs(ws)), ws) * layer.A.detach()
            B = B + math.sqrt(abs(ws)) * layer.B.detach()
        state[f"layers.{key}.A"], state[f"layers.{key}.B"] = A, B
    return _plain(parts[0].config, parts[0].config.r), state


def _lora_cat(parts, weights):
    _check_default_lora(parts, "cat")
    state = {}
    for site in parts[0].controller.sites:
        key = site_key(site.name)
        layers = [p.controller.layers[key] for p in parts]
        state[f"layers.{key}.A"] = torch.cat([w * lay.scale * lay.A.detach() for w, lay in zip(weights, layers)])
        state[f"layers.{key}.B"] = torch.cat([lay.B.detach() for lay in layers], dim=1)
    return _plain(parts[0].config, sum(p.config.r for p in parts)), state


def _lora_svd(model, parts, weights, r):
    r = r or max(p.config.r for p in parts)
    if r < 1:
        raise ValueError(f"svd rank r must be ≥ 1, got {r}")
    state = {}
    for site in parts[0].controller.sites:
        key = site_key(site.name)
        W = model.get_submodule(site.module).weight.detach()
        update = sum(w * _weight_update(p.controller.layers[key], site, W) for w, p in zip(weights, parts))
        U, S, Vh = torch.linalg.svd(update, full_matrices=False)
        state[f"layers.{key}.B"] = U[:, :r] * S[:r]
        state[f"layers.{key}.A"] = Vh[:r]
    return _plain(parts[0].config, r), state


def _weight_update(layer, site, W):
    """ΔW of one LoRA layer, read off its merge law: law(W) − W, in δ's dtype."""
    (attribute, law), = layer.weight_laws(site)
    W = W.to(layer.A.dtype)
    return law(W) - W

