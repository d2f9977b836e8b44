"""Save δ: safetensors for the tensors, JSON for the config, a fingerprint of the base model (``load.py`` reads it).

δ is saved in its own dtype (float32 on a half-precision base) and loaded into the dtype ``attach`` gives it on
the model it is loaded onto, so values round-trip exactly whenever that dtype is at least as wide as the saved one.
A δ saved on a half-precision copy of a base loads onto the base in a wider dtype (its weights cast to the saved
dtype must reproduce the saved fingerprint); the other way round cannot be checked from the narrower weights and
is refused with a message naming both dtypes.

Files are written atomically (a temp file in the same folder, fsync, ``os.replace``) and a δ save commits by
renaming its JSON into place, so a kill at any point leaves either the previous δ or the new one, never a mix: a
save that had reached its commit point is completed by the next save, and ``load`` reads what was committed. The
JSON holds a content hash of every tensor and of the JSON itself; ``load`` refuses a δ whose files no longer match
it (``verify=False`` loads a δ edited on purpose).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltactl.control.root import base_named_parameters, deltas

FORMAT = 1
TENSORS, CONFIG = "delta.safetensors", "delta.json"
PENDING = ".new"  # a δ file written completely, waiting to replace the committed one


# Atomic writing. ``_step`` marks each durable step (a file written, a rename, a removal); tests replace it to
# simulate a kill after any step.

def _step(what: str) -> None:
    """Called after each durable step of a write; does nothing (tests raise here to simulate a kill)."""


def _fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_atomic(path, data) -> Path:
    """Write ``path`` whole or not at all: ``data`` (bytes, str, or a function writing the given path) goes to a
    temp file beside it, is fsynced, and replaces ``path`` by ``os.replace``."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        _fsync_file(tmp)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    _step(f"wrote {tmp.name}")
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    _step(f"replaced {path.name}")
    return path


def remove_temp_files(folder) -> None:
    """Remove the temp files ``write_atomic`` leaves when a process is killed mid-write."""
    for stale in Path(folder).glob(".*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _siblings(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")


def recover_dir(folder) -> None:
    """Repair what a kill during ``replace_dir`` can leave: a missing ``folder`` whose previous version is still at
    ``folder.old`` is put back; a leftover ``folder.tmp`` (unfinished) and ``folder.old`` (superseded) go."""
    folder = Path(folder)
    tmp, old = _siblings(folder)
    if not folder.exists() and old.exists():
        os.rename(old, folder)
        _step(f"restored {folder.name}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
            _step(f"removed {leftover.name}")


def readable_dir(folder) -> Path:
    """The complete version of a folder ``replace_dir`` writes, without changing anything on disk."""
    folder = Path(folder)
    _, old = _siblings(folder)
    return old if not folder.exists() and old.exists() else folder


def staging_dir(folder) -> Path:
    """An empty ``folder.tmp`` to build the next version of ``folder`` in (after repairing a killed write)."""
    folder = Path(folder)
    recover_dir(folder)
    tmp, _ = _siblings(folder)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(folder) -> None:
    """Make ``folder.tmp`` (from ``staging_dir``) the new ``folder``: fsync its files, then swap by renames."""
    folder = Path(folder)
    tmp, old = _siblings(folder)
    for root, _, files in os.walk(tmp):
        for name in files:
            _fsync_file(os.path.join(root, name))
        _fsync_dir(root)
    if folder.exists():
        os.rename(folder, old)
        _step(f"moved {folder.name} to {old.name}")
    os.rename(tmp, folder)
    _fsync_dir(folder.parent)
    _step(f"moved {tmp.name} to {folder.name}")
    if old.exists():
        shutil.rmtree(old)
        _step(f"removed {old.name}")


def tensor_digest(tensors: dict) -> str:
    """SHA-256 of named tensors: every name, dtype, shape and byte, in name order (independent of the file layout)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        data = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}\n".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def meta_digest(meta: dict) -> str:
    """SHA-256 of a δ's JSON record without its own ``sha256`` field (keys sorted)."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
        "model_type": model.config.model_type, "parameters": total, "dtype": dtype_name(dtype or own),
        "sha256": digest.hexdigest(),
    }


def dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def base_fingerprint(model) -> dict:
    """The fingerprint of the base weights as they are without merged deltas (merges are undone, then redone)."""
    merged = [d for d in deltas(model).values() if d.merged]
    for d in reversed(merged):
        d.unmerge()
    try:
        return fingerprint(model)
    finally:
        for d in merged:
            d.merge()


def save(delta, path) -> Path:
    """Write ``path/delta.safetensors`` (δ) and ``path/delta.json`` (method config, sites, base fingerprint, content
    hashes), atomically: both files are written beside the old ones, then the JSON commits them."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _finish_save(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in delta.controller.state_dict().items()}
    meta = {
        "format": FORMAT,
        "name": delta.name,
        "config": delta.config.to_dict(),
        "sites": [s.name for s in delta.controller.sites],
        "dtype": sorted({dtype_name(t.dtype) for t in tensors.values()}),  # δ's, for the reader; loading casts
        "base": base_fingerprint(delta.model),
        "tensors_sha256": tensor_digest(tensors),
    }
    meta["sha256"] = meta_digest(meta)
    write_atomic(path / (TENSORS + PENDING), lambda tmp: save_file(tensors, str(tmp)))
    write_atomic(path / (CONFIG + PENDING), json.dumps(meta, indent=2) + "\n")  # the commit point
    _finish_save(path)
    return path


def _finish_save(path: Path) -> None:
    """Complete a committed save (``delta.json.new`` present) or drop an uncommitted one; remove temp files."""
    remove_temp_files(path)
    if (path / (CONFIG + PENDING)).exists():
        if (path / (TENSORS + PENDING)).exists():
            os.replace(path / (TENSORS + PENDING), path / TENSORS)
            _step(f"replaced {TENSORS}")
        os.replace(path / (CONFIG + PENDING), path / CONFIG)
        _fsync_dir(path)
        _step(f"replaced {CONFIG}")
    elif (path / (TENSORS + PENDING)).exists():
        (path / (TENSORS + PENDING)).unlink()
        _step(f"removed {TENSORS + PENDING}")


def committed_files(path: Path) -> tuple[Path, Path]:
    """(tensor file, JSON file) of the δ last committed at ``path``, also midway through a save that was killed."""
    if (path / (CONFIG + PENDING)).is_file():
        pending = path / (TENSORS + PENDING)
        return (pending if pending.is_file() else path / TENSORS), path / (CONFIG + PENDING)
    return path / TENSORS, path / CONFIG
