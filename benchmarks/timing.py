"""Device-correct timing and memory for the benchmarks: CUDA is synchronised around every timed region, and peak
memory on CUDA is ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``.

Each benchmark keeps its own CPU memory measurement (resident set in a fresh process) where it has one; on a CPU
``cuda_peak`` reports None, printed as "—".
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time

import torch

MIB = 2**20


def is_cuda(device) -> bool:
    return str(device).startswith("cuda")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def autocast(device, bf16: bool):
    """bf16 autocast on ``device`` (CUDA or CPU) when ``bf16``, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def seconds(fn, device) -> float:
    """Wall time of one call of ``fn``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def cuda_peak(device, into: dict):
    """Within the block, CUDA's peak of allocated memory: sets ``into["peak_bytes"]`` (the peak) and
    ``into["extra_bytes"]`` (the peak minus what was allocated when the block began); both None on a CPU."""
    into["peak_bytes"] = into["extra_bytes"] = None
    if not is_cuda(device):
        yield into
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield into
    sync(device)
    into["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    into["extra_bytes"] = into["peak_bytes"] - before


def free(device) -> None:
    """Let go of what the last measurement left, so the next one's peak counts its own memory."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def mib(n_bytes, spec: str = ".1f") -> str:
    """Bytes as MiB, or "—" when not measured."""
    return "—" if n_bytes is None else format(n_bytes / MIB, spec)


def add_device_arguments(parser: argparse.ArgumentParser, bf16: str | None = None) -> None:
    """``--device`` (default: cuda when available) and, with a help text for it, ``--bf16``."""
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda when available)")
    if bf16:
        parser.add_argument("--bf16", action="store_true", help=bf16)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if is_cuda(device) else "CPU"
