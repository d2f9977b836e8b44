"""Resumable training state on disk: tensors in safetensors, the rest in JSON, replaced atomically.

The JSON holds a content hash of every tensor and of itself; loading refuses a checkpoint whose files no longer
match (a flipped bit would otherwise resume silently from wrong optimiser moments or δ).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltactl.control.io import meta_digest, readable_dir, replace_dir, staging_dir, tensor_digest


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


def save_checkpoint(
    folder: Path, trainable: dict, optimizer, scheduler, progress: dict, scaler=None, generators: list | None = None
) -> None:
    """Write ``folder`` as a whole or not at all (a kill mid-write leaves the previous checkpoint, which the next
    save or load recovers); ``scaler``: the loss scaler of a float16 run, whose scale is part of the state;
    ``generators``: the torch RNG state of every process of a multi-process run, in rank order (default: this
    process's)."""
    folder = Path(folder)
    tmp = staging_dir(folder)
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    opt_tensors, opt_scalars = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    generators = generators or [torch.get_rng_state()]
    tensors["rng/torch"] = generators[0]
    for rank, generator in enumerate(generators[1:], 1):
        tensors[f"rng/torch/{rank}"] = generator
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"progress": progress, "optimizer": opt_scalars, "scheduler": scheduler.state_dict()}
    if scaler is not None:
        meta["scaler"] = scaler.state_dict()
    meta["tensors_sha256"] = tensor_digest(tensors)
    meta["sha256"] = meta_digest(meta)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    replace_dir(folder)  # fsyncs, then swaps by renames


def load_checkpoint(folder: Path, trainable: dict, optimizer, scheduler, scaler=None, rank: int = 0) -> dict:
    """Restore parameters, optimizer, scheduler, loss scaler and RNG from ``folder``; returns the saved progress.
    ``rank``: this process's rank in a multi-process run; it takes its own RNG state if the checkpoint has one
    (a run resumed with more processes than it was saved with gives the new ones the main process's)."""
    folder = readable_dir(folder)  # checkpoint.old if a kill came between the two renames
    tensor_file, config_file = folder / "state.safetensors", folder / "state.json"
    damaged = "the checkpoint is damaged; start the run afresh (--fresh, or a new --out)"
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): {damaged}") from None
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{tensor_file} cannot be read as safetensors ({err}): {damaged}") from None
    if "sha256" in meta:  # checkpoints written before content hashes load unverified
        if meta_digest(meta) != meta["sha256"]:
            raise ValueError(f"{config_file} does not match its stored content hash: {damaged}")
        if tensor_digest(tensors) != meta["tensors_sha256"]:
            raise ValueError(f"{tensor_file} does not match the content hash stored in {config_file.name}: {damaged}")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[f"param/{name}"])
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors.get(f"rng/torch/{rank}", tensors["rng/torch"]))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")])
    return meta["progress"]


def has_checkpoint(folder: Path) -> bool:
    return (readable_dir(folder) / "state.json").exists()
