"""Resumable training state on disk: tensors in safetensors, the rest in JSON, replaced atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(idx), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict, scalars: dict) -> dict:
    state: dict = {int(idx): dict(slots) for idx, slots in scalars["state"].items()}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(folder: Path, trainable: dict, optimizer, scheduler, progress: dict, scaler=None) -> None:
    """Write ``folder`` as a whole or not at all (a kill mid-write leaves the previous checkpoint); ``scaler``: the
    loss scaler of a float16 run, whose scale is part of the state."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    opt_tensors, opt_scalars = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"progress": progress, "optimizer": opt_scalars, "scheduler": scheduler.state_dict()}
    if scaler is not None:
        meta["scaler"] = scaler.state_dict()
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, trainable: dict, optimizer, scheduler, scaler=None) -> dict:
    """Restore parameters, optimizer, scheduler, loss scaler and RNG from ``folder``; returns the saved progress."""
    folder = Path(folder)
    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # killed between the two renames
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[f"param/{name}"])
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")])
    return meta["progress"]


def has_checkpoint(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / "state.json").exists() or (folder.with_name(folder.name + ".old") / "state.json").exists()
