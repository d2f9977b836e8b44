"""Save and load δ: safetensors for the tensors, JSON for the config, a fingerprint of the base model."""

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


def fingerprint(model) -> dict:
    """Identity of a base model: its type, parameter count and a SHA-256 of every base weight (names, shapes, bytes)."""
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    total = 0
    for name, param in base_named_parameters(model):
        data = param.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        total += data.numel()
    return {"model_type": model.config.model_type, "parameters": total, "sha256": digest.hexdigest()}


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
        "base": _base_fingerprint(delta.model),
    }
    (path / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load(model, path, *, name: str | None = None) -> Delta:
    """Attach the delta saved at ``path`` to ``model``; refuses a model other than the one it was trained on."""
    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a saved delta: expected {CONFIG} and {TENSORS} in it")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG} has format {meta.get('format')!r}; this deltactl reads format {FORMAT}")
    expected, actual = meta["base"], fingerprint(model)
    if expected["sha256"] != actual["sha256"]:
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
    delta = attach(model, config_from_dict(meta["config"]), name=name or meta["name"])
    tensors = load_file(str(path / TENSORS))
    reference = next(iter(delta.controller.parameters()), None)
    if reference is not None:
        tensors = {k: v.to(device=reference.device) for k, v in tensors.items()}
    delta.controller.load_state_dict(tensors, strict=True)
    return delta
