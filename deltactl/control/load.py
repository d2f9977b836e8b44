"""Load a saved δ onto a model, checking it first: the files' content hashes, the base model's fingerprint (also
across dtypes), and that the tensors fit the controller the saved config builds on this model (names, shapes and
dtypes, each named when it does not).

The fingerprint is checked in the scheme the δ was saved with (``io.fingerprint``). Loading is meant for the model
before ``fully_shard`` (docs/fsdp.md); onto a sharded model (collective: every rank loads) only a δ with a row
fingerprint can be checked, and the δ is then attached outside FSDP, replicated on every rank.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltactl.control.attach import Delta, attach
from deltactl.control.io import (
    CONFIG,
    FORMAT,
    TENSORS,
    WHOLE,
    committed_files,
    dtype_name,
    fingerprint,
    meta_digest,
    sharded,
    tensor_digest,
)
from deltactl.control.registry import config_from_dict


def load(
    model, path, *, name: str | None = None, dtype: torch.dtype | None = None, verify: bool = True
) -> Delta:
    """Attach the delta saved at ``path`` to ``model``; refuses a model other than the one it was trained on.

    δ takes the dtype ``attach`` gives it on ``model`` (float32 on a half-precision base), or ``dtype``; the saved
    values are cast to it. The files must match the content hashes stored at save time; ``verify=False`` loads a
    δ whose files were changed on purpose (the base model is still checked).
    """
    path = Path(path)
    tensor_file, config_file = committed_files(path)
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
    elif verify and meta_digest(meta) != meta["sha256"]:
        raise ValueError(
            f"{config_file} was changed after it was saved: its content no longer matches its stored hash "
            f"(sha256 {meta['sha256'][:12]}…); {escape}"
        )
    expected = meta["base"]
    scheme = expected.get("scheme", WHOLE)
    if scheme == WHOLE and sharded(model):
        raise ValueError(
            f"the delta at {path} records the whole-weight SHA-256 of its base, and this model is sharded (FSDP2): "
            "checking it would gather every base weight, which deltactl does not do. Load the delta before "
            "fully_shard (docs/fsdp.md); a delta saved from a sharded model records a row fingerprint and loads "
            "onto a sharded model too"
        )
    actual = fingerprint(model, scheme=scheme)
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
        _check_fit(path, delta.config.method, tensors, own)
        # Floating-point values are cast to δ's dtype here (exact when it is at least as wide as the saved one).
        tensors = {k: v.to(device=own[k].device, dtype=own[k].dtype) for k, v in tensors.items()}
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
    if fingerprint(model, getattr(torch, saved), scheme=expected.get("scheme"))["sha256"] == expected["sha256"]:
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


def _check_fit(path, method: str, saved: dict, own: dict) -> None:
    """Refuse saved tensors that do not fit the controller the saved config builds here, naming the first tensor
    that is missing, extra, of another shape or of another kind of dtype (files edited with ``verify=False``, or
    saved by another version of a method)."""
    where = f"the delta at {path}"
    missing = [k for k in own if k not in saved]
    if missing:
        raise ValueError(f"{where} has no tensor {missing[0]!r}, which this {method} needs "
                         f"({len(missing)} missing of {len(own)}); it was not saved by this method and config")
    extra = [k for k in saved if k not in own]
    if extra:
        raise ValueError(f"{where} holds {extra[0]!r}, which this {method} does not have ({len(extra)} extra); "
                         f"its tensors are {', '.join(sorted(own)[:4])}{', …' if len(own) > 4 else ''}")
    for key, value in saved.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{where} holds {key!r} with shape {tuple(value.shape)}, but this {method} on this model "
                             f"has shape {tuple(own[key].shape)} there; it was saved with other options or edited")
        if value.is_floating_point() != own[key].is_floating_point():
            raise ValueError(f"{where} holds {key!r} as {dtype_name(value.dtype)}, but this {method} keeps it as "
                             f"{dtype_name(own[key].dtype)}; it was not saved by this method")
