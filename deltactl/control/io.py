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

Sharded backbones (FSDP2's ``fully_shard``, docs/fsdp.md): saving is then collective (every rank of the mesh calls
it). δ is gathered whole (only δ, never a frozen weight) and the first rank of the mesh writes the files; the tensor
file has the same bytes an unsharded save of the same δ writes. The base fingerprint cannot be the SHA-256 of the
whole weights without gathering them, so it is a row fingerprint (``scheme: "sha256-rows"``): the SHA-256 of every
weight's rows' SHA-256 digests, which each rank computes for its own rows, so only 32-byte digests travel. It does
not depend on the number of ranks, and an unsharded model computes it too, so such a δ loads on either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltactl.control.merge import dtensor_type, is_sharded, reshard, row_sharding
from deltactl.control.root import base_named_parameters, deltas

FORMAT = 1
TENSORS, CONFIG = "delta.safetensors", "delta.json"
PENDING = ".new"  # a δ file written completely, waiting to replace the committed one
WHOLE, ROWS = "sha256", "sha256-rows"  # fingerprint schemes: of the whole weights (no "scheme" key), of their rows


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


def fingerprint(model, dtype: torch.dtype | None = None, scheme: str | None = None) -> dict:
    """Identity of a base model: its type, parameter count, dtype and a SHA-256 of every base weight (names, dtypes,
    shapes, bytes). With ``dtype``, of the model's floating-point weights cast to that dtype.

    ``scheme``: ``"sha256"`` hashes each weight whole; ``"sha256-rows"`` hashes the digests of its rows (dim 0), so
    a model sharded by FSDP2 computes it without gathering a weight (collective there: every rank calls it). The
    default is the first on an unsharded model and the second on a sharded one; only the second records its scheme.
    """
    reshard(model)
    params = base_named_parameters(model)
    distributed = any(is_sharded(p) for _, p in params)
    scheme = scheme or (ROWS if distributed else WHOLE)
    if scheme not in (WHOLE, ROWS):
        raise ValueError(f"unknown fingerprint scheme {scheme!r}; the schemes are {WHOLE!r} and {ROWS!r}")
    if scheme == WHOLE and distributed:
        raise ValueError(
            "the whole-weight fingerprint (scheme 'sha256') needs every base weight whole on one rank, and this "
            "model's weights are sharded (FSDP2): deltactl does not gather them. Use scheme 'sha256-rows' (sharded "
            "saves record it), or take the fingerprint before fully_shard"
        )
    digest = hashlib.sha256(str(getattr(model.config, "model_type", "")).encode())
    total = 0
    own = next((p.dtype for _, p in params if p.is_floating_point()), None)
    if scheme == ROWS:
        for (name, param), rows in zip(params, _row_digests(params, dtype)):
            kind = dtype if dtype is not None and param.is_floating_point() else param.dtype
            digest.update(f"{name}:{kind}:{tuple(param.shape)}".encode())
            digest.update(rows)
            total += param.numel()
        params = []
    for name, param in params:
        data = param.detach().to("cpu")
        if dtype is not None and data.is_floating_point():
            data = data.to(dtype)
        data = data.contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        total += data.numel()
    found = {
        "model_type": model.config.model_type, "parameters": total, "dtype": dtype_name(dtype or own),
        "sha256": digest.hexdigest(),
    }
    return found if scheme == WHOLE else {**found, "scheme": ROWS}


def _rows_of(data: torch.Tensor, dtype) -> bytes:
    """The SHA-256 digest of each row (dim-0 slice) of ``data``, concatenated (a 0-d tensor is one row)."""
    data = data.detach().to("cpu")
    if dtype is not None and data.is_floating_point():
        data = data.to(dtype)
    data = data.contiguous().reshape(data.shape[0] if data.dim() else 1, -1)
    if data.numel() == 0:
        return hashlib.sha256(b"").digest() * data.shape[0]
    return b"".join(hashlib.sha256(row).digest() for row in data.view(torch.uint8).numpy())


def _row_digests(params, dtype) -> list[bytes]:
    """Every parameter's row digests (``_rows_of`` of the whole parameter). A parameter sharded by rows over a
    mesh contributes its own rows on each rank, and the digests are gathered over the mesh in mesh order; no weight
    leaves its rank."""
    found, shards = [], {}  # shards: mesh -> {parameter index: this rank's row digests}
    for i, (name, param) in enumerate(params):
        if is_sharded(param):
            mesh, split = row_sharding(param, f"the base weight {name!r}")
            if split:
                shards.setdefault(mesh, {})[i] = _rows_of(param.to_local(), dtype)
                found.append(None)
                continue
            param = param.to_local()  # replicated: whole on every rank
        found.append(_rows_of(param, dtype))
    for mesh, mine in shards.items():
        gathered = [None] * mesh.size()
        torch.distributed.all_gather_object(gathered, (mesh.get_local_rank(), mine), group=mesh.get_group())
        for i in mine:
            found[i] = b"".join(part[i] for _, part in sorted(gathered, key=lambda g: g[0]))
            rows = params[i][1].shape[0] if params[i][1].dim() else 1
            if len(found[i]) != 32 * rows:
                raise RuntimeError(f"the shards of {params[i][0]!r} hold {len(found[i]) // 32} rows, not {rows}: "
                                   "they do not tile the weight by rows")
    return found


def sharded(model) -> bool:
    """Whether FSDP2 shards any of ``model``'s parameters (then saves and fingerprints are collective)."""
    return any(is_sharded(p) for p in model.parameters())


def dtype_name(dtype) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def base_fingerprint(model, scheme: str | None = None) -> dict:
    """The fingerprint of the base weights as they are without merged deltas (merges are undone, then redone)."""
    merged = [d for d in deltas(model).values() if d.merged]
    for d in reversed(merged):
        d.unmerge()
    try:
        return fingerprint(model, scheme=scheme)
    finally:
        for d in merged:
            d.merge()


def save(delta, path) -> Path:
    """Write ``path/delta.safetensors`` (δ) and ``path/delta.json`` (method config, sites, base fingerprint, content
    hashes), atomically: both files are written beside the old ones, then the JSON commits them.

    On a model sharded by FSDP2 every rank of the mesh calls it: δ is gathered whole (never a frozen weight), the
    base gets a row fingerprint, and the mesh's first rank writes; all return once the files are committed."""
    path = Path(path)
    reshard(delta.model)
    group = _shard_group(delta.model)
    tensors = {k: _whole(v).detach().contiguous().cpu() for k, v in delta.controller.state_dict().items()}
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
    if group is None:
        _write_save(path, tensors, meta)
        return path
    versions = set(_gather(meta["tensors_sha256"], group))
    if len(versions) > 1:
        raise ValueError(
            f"δ of delta {delta.name!r} differs between the ranks of the mesh ({len(versions)} versions), so no rank's "
            "copy is the delta. A delta attached after fully_shard stays outside FSDP: replicated on every rank, its "
            "gradients are not averaged. Attach (or load) it before fully_shard (docs/fsdp.md), or all-reduce its "
            "gradients yourself"
        )
    error = None
    if torch.distributed.get_rank(group) == 0:
        try:
            _write_save(path, tensors, meta)
        except Exception as err:  # told to every rank below, so none waits for a save that failed
            error = err
    failed = [e for e in _gather(None if error is None else f"{type(error).__name__}: {error}", group) if e]
    if error is not None:
        raise error
    if failed:
        raise OSError(f"the first rank of the mesh could not save the delta at {path}: {failed[0]}")
    return path


def _write_save(path: Path, tensors: dict, meta: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _finish_save(path)
    write_atomic(path / (TENSORS + PENDING), lambda tmp: save_file(tensors, str(tmp)))
    write_atomic(path / (CONFIG + PENDING), json.dumps(meta, indent=2) + "\n")  # the commit point
    _finish_save(path)


def _whole(tensor):
    """A δ tensor whole on this rank: a DTensor (δ sharded with the model by FSDP2) gathered, any other as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _shard_group(model):
    """The process group of the mesh FSDP2 shards ``model`` over, or None for an unsharded model."""
    if dtensor_type() is None:
        return None
    first = next(((n, p) for n, p in model.named_parameters() if is_sharded(p)), None)
    return None if first is None else row_sharding(first[1], f"the parameter {first[0]!r}")[0].get_group()


def _gather(value, group) -> list:
    found = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(found, value, group=group)
    return found


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
