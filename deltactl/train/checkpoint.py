"""Resumable training state on disk: tensors in safetensors, the rest in JSON, replaced atomically.

The JSON holds a content hash of every tensor and of itself; loading refuses a checkpoint whose files no longer
match (a flipped bit would otherwise resume silently from wrong optimiser moments or δ).
"""

from __future__ import annotations

import json
import re
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


def generator_states(device=None) -> dict:
    """This process's random-number generators: torch's CPU generator, and on a GPU the generator of ``device``
    (the one its dropout draws from)."""
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda" and torch.cuda.is_available()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if cuda else None}


def save_checkpoint(
    folder: Path, trainable: dict, optimizer, scheduler, progress: dict, scaler=None, generators: list | None = None
) -> None:
    """Write ``folder`` as a whole or not at all (a kill mid-write leaves the previous checkpoint, which the next
    save or load recovers); ``scaler``: the loss scaler of a float16 run, whose scale is part of the state;
    ``generators``: ``generator_states()`` of every process of a multi-process run, in rank order (default: this
    process's, with the generators of every GPU it sees)."""
    folder = Path(folder)
    tmp = staging_dir(folder)
    tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in trainable.items()}
    opt_tensors, opt_scalars = _flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    if generators is None:
        generators = [generator_states()]
        if torch.cuda.is_available():  # no launcher: keep every GPU's generator (rng/cuda0, rng/cuda1, …)
            tensors.update({f"rng/cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for rank, states in enumerate(generators):  # rank 0 under the plain names, rank r under NAME/r
        suffix = f"/{rank}" if rank else ""
        tensors[f"rng/torch{suffix}"] = states["torch"]
        if states.get("cuda") is not None:
            tensors[f"rng/cuda{suffix}"] = states["cuda"]
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"progress": progress, "optimizer": opt_scalars, "scheduler": scheduler.state_dict()}
    if scaler is not None:
        meta["scaler"] = scaler.state_dict()
    meta["tensors_sha256"] = tensor_digest(tensors)
    meta["sha256"] = meta_digest(meta)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    replace_dir(folder)  # fsyncs, then swaps by renames


def load_checkpoint(
    folder: Path, trainable: dict, optimizer, scheduler, scaler=None, rank: int = 0, device=None
) -> dict:
    """Restore parameters, optimizer, scheduler, loss scaler and RNG from ``folder``; returns the saved progress.
    ``rank``: this process's rank in a multi-process run, ``device`` its GPU; it takes its own generator states if
    the checkpoint has them (a run resumed with more processes than it was saved with gives the new ones the main
    process's)."""
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
        every_gpu = sorted((int(m[1]), k) for k in tensors if (m := re.fullmatch(r"rng/cuda(\d+)", k)))
        if every_gpu:  # saved without a launcher: every GPU's generator, by device number
            torch.cuda.set_rng_state_all([tensors[k] for _, k in every_gpu])
        own = tensors.get(f"rng/cuda/{rank}", tensors.get("rng/cuda"))
        if own is not None and device is not None and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state(own, device)
    return meta["progress"]


def has_checkpoint(folder: Path) -> bool:
    return (readable_dir(folder) / "state.json").exists()
