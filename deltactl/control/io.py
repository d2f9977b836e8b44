"""Save and load δ: safetensors for the tensors, JSON for the config, a fingerprint of the base model.

δ is saved in its own dtype (float32 on a half-precision base) and loaded into the dtype ``attach`` gives it on
the model it is loaded onto, so values round-trip exactly whenever that dtype is at least as wide as the saved one.
A δ saved on a half-precision copy of a base loads onto the base in a wider dtype (its weights cast to the saved
dtype must reproduce the saved fingerprint); the other way round cannot be checked from the narrower weights and
is refused with a message naming both dtypes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltactl.control.attach import Delta, attach, base_named_parameters, deltas
from deltactl.methods.registry import config_from_dict

FORMAT = 1
TENSORS, CONFIG = "delta.safetensors", "delta.json"


def fingerprint(model, dtype: torch.dtype | None = None) -> dict:
    """Identity of a base model: its type, parameter count, dtype and a SHA-256 of every base weight (names, dtypes,
    shapes, bytes). With ``dtype``, of the model's floating-point weights cast to that dtype."""
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    total = 0
    params = base_named_parameters(model)
    own = next((p.dtype for _, p in params if p.is_floating_point()), None)
    for name, param in params:
        data = param.detach().to("cpu")
        if dtype is not None and data.is_floating_point():
            data = data.to(dtype)
        data = data.contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        total += data.numel()
    return {
        "model_type": model.config.model_type, "parameters": total, "dtype": _name(dtype or own),
        "sha256": digest.hexdigest(),
    }


def _name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _base_fingerprint(model) -> dict:
    """The fingerprint of the base weights as they are without merged deltas (merges are undone, then redone)."""
    merged = [d for d in deltas(model).values() if d.merged]
    for d in reversed(merged):
        d.unmerge()
    try:
        return fingerprint(model)
    finally:
        for d in merged:
            d.merge()


def save(delta: Delta, path) -> Path:
    """Write ``path/delta.safetensors`` (δ) and ``path/delta.json`` (method config, sites, base fingerprint)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in delta.controller.state_dict().items()}
    save_file(tensors, str(path / TENSORS))
    meta = {
        "format": FORMAT,
        "name": delta.name,
        "config": delta.config.to_dict(),
        "sites": [s.name for s in delta.controller.sites],
        "dtype": sorted({_name(t.dtype) for t in tensors.values()}),  # δ's, for the reader; loading casts
        "base": _base_fingerprint(delta.model),
    }
    (path / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(model, path, *, name: str | None = None, dtype: torch.dtype | None = None) -> Delta:
    """Attach the delta saved at ``path`` to ``model``; refuses a model other than the one it was trained on.

    δ takes the dtype ``attach`` gives it on ``model`` (float32 on a half-precision base), or ``dtype``; the saved
    values are cast to it.
    """
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved delta: expected {CONFIG} and {TENSORS} in it")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} has format {meta.get('format')!r}; this deltactl reads format {FORMAT}")
    expected, actual = meta["base"], fingerprint(model)
    if expected["sha256"] != actual["sha256"] and not _same_base_in_another_dtype(model, expected, actual, path):
        what = (
            "its weights differ"
            if (expected["model_type"], expected["parameters"]) == (actual["model_type"], actual["parameters"])
            else f"it is a {actual['model_type']} with {actual['parameters']:,} parameters"
        )
        raise ValueError(
            f"the delta at {path} was trained on a {expected['model_type']} base with {expected['parameters']:,} "
            f"parameters (sha256 {expected['sha256'][:12]}…), but this model is another one: {what} "
            f"(sha256 {actual['sha256'][:12]}…). Load it onto the base model it was trained on."
        )
    tensors = load_file(str(path / TENSORS))
    delta = attach(model, config_from_dict(meta["config"]), name=name or meta["name"], dtype=dtype)
    try:
        own = delta.controller.state_dict()
        for key, value in tensors.items():
            if key in own and value.is_floating_point() != own[key].is_floating_point():
                raise ValueError(
                    f"the delta at {path} holds {key!r} as {_name(value.dtype)}, but this {delta.config.method} "
                    f"keeps it as {_name(own[key].dtype)}; it was not saved by this method"
                )
        # Floating-point values are cast to δ's dtype here (exact when it is at least as wide as the saved one).
        tensors = {k: v.to(device=own[k].device, dtype=own[k].dtype) if k in own else v for k, v in tensors.items()}
        delta.controller.load_state_dict(tensors, strict=True)
    except Exception:
        delta.detach()  # leave the model as it was
        raise
    return delta


def _same_base_in_another_dtype(model, expected: dict, actual: dict, path) -> bool:
    """Whether ``model`` is the saved base in another dtype: its weights cast to the saved dtype give the saved
    fingerprint. Raises with both dtypes named when the dtypes differ but this cannot be shown."""
    saved = expected.get("dtype")
    if saved is None or saved == actual["dtype"] or (expected["model_type"], expected["parameters"]) != (
        actual["model_type"], actual["parameters"]
    ):
        return False
    if fingerprint(model, getattr(torch, saved))["sha256"] == expected["sha256"]:
        return True
    mine = actual["dtype"]
    if getattr(torch, saved).itemsize > getattr(torch, mine).itemsize:
        raise ValueError(
            f"the delta at {path} was saved on a {saved} base, and this model is in {mine}: a {mine} copy cannot be "
            f"checked against the {saved} weights the delta was saved with. Load the base in {saved} (e.g. "
            f"from_pretrained(..., dtype=torch.{saved})) to load this delta. (A delta saved on a {mine} base loads "
            f"onto the same base in {saved}, not the other way round.)"
        )
    raise ValueError(
        f"the delta at {path} was saved on a {saved} base, and this model is in {mine}: cast to {saved}, its weights "
        f"are not that base's (sha256 {expected['sha256'][:12]}…). Load it onto the base it was trained on."
    )
