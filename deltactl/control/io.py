"""Save and load δ: safetensors for the tensors, JSON for the config, a fingerprint of the base model.

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
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltactl.control.attach import Delta, attach, base_named_parameters, deltas
from deltactl.control.registry import config_from_dict

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


def _meta_digest(meta: dict) -> str:
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
        "dtype": sorted({_name(t.dtype) for t in tensors.values()}),  # δ's, for the reader; loading casts
        "base": _base_fingerprint(delta.model),
        "tensors_sha256": tensor_digest(tensors),
    }
    meta["sha256"] = _meta_digest(meta)
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


def _committed(path: Path) -> tuple[Path, Path]:
    """(tensor file, JSON file) of the δ last committed at ``path``, also midway through a save that was killed."""
    if (path / (CONFIG + PENDING)).is_file():
        pending = path / (TENSORS + PENDING)
        return (pending if pending.is_file() else path / TENSORS), path / (CONFIG + PENDING)
    return path / TENSORS, path / CONFIG


def load(
    model, path, *, name: str | None = None, dtype: torch.dtype | None = None, verify: bool = True
) -> Delta:
    """Attach the delta saved at ``path`` to ``model``; refuses a model other than the one it was trained on.

    δ takes the dtype ``attach`` gives it on ``model`` (float32 on a half-precision base), or ``dtype``; the saved
    values are cast to it. The files must match the content hashes stored at save time; ``verify=False`` loads a
    δ whose files were changed on purpose (the base model is still checked).
    """
    path = Path(path)
    tensor_file, config_file = _committed(path)
    if not config_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved delta: expected {CONFIG} and {TENSORS} in it")
    try:
        meta = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the file is damaged or half-written") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{config_file} has format {version!r}; this deltactl reads format {FORMAT}")
    escape = "pass verify=False to load it anyway if the change was deliberate"
    if verify and "sha256" not in meta:
        warnings.warn(f"{config_file} has no content hash (saved by an older deltactl): loading it unverified",
                      stacklevel=2)
    elif verify and _meta_digest(meta) != meta["sha256"]:
        raise ValueError(
            f"{config_file} was changed after it was saved: its content no longer matches its stored hash "
            f"(sha256 {meta['sha256'][:12]}…); {escape}"
        )
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
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{tensor_file} cannot be read as safetensors ({err}); the file is damaged") from None
    if verify and "tensors_sha256" in meta and tensor_digest(tensors) != meta["tensors_sha256"]:
        raise ValueError(
            f"{tensor_file} does not match the content hash stored in {config_file.name} (sha256 "
            f"{meta['tensors_sha256'][:12]}…): the tensors were changed or corrupted after saving; {escape}"
        )
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
