"""Resumable training state on disk: tensors in safetensors, the rest in JSON, replaced atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltactl.control.io import readable_dir, replace_dir, staging_dir


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
    """Write ``folder`` as a whole or not at all (a kill mid-write leaves the previous checkpoint, which the next
    save or load recovers); ``scaler``: the loss scaler of a float16 run, whose scale is part of the state."""
    folder = Path(folder)
    tmp = staging_dir(folder)
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
    replace_dir(folder)  # fsyncs, then swaps by renames


def load_checkpoint(folder: Path, trainable: dict, optimizer, scheduler, scaler=None) -> dict:
    """Restore parameters, optimizer, scheduler, loss scaler and RNG from ``folder``; returns the saved progress."""
    folder = readable_dir(folder)  # checkpoint.old if a kill came between the two renames
    tensors = load_file(str(folder / "state.safetensors"))
    try:
        meta = json.loads((folder / "state.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'state.json'} is not valid JSON ({err}): the checkpoint is damaged; start "
                         "the run afresh in a new --out") from None
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
    return (readable_dir(folder) / "state.json").exists()
