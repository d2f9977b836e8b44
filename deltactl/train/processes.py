"""Training in several processes (``accelerate launch`` or ``torchrun``): who writes, and how the others follow.

Every process builds the same model and runs the same steps on its share of each global batch; accelerate wraps the
model in DistributedDataParallel, which averages the gradients of the parameters that train (δ and the head) after
each backward. Frozen weights have no gradient, so nothing else is exchanged during training.

Only the main process touches the run folder: it locks it, checks what it holds, writes run.json, the log, the
checkpoints and the best δ, and it evaluates. The other processes receive its decisions through ``on_main``, so
all take the same branches (resume or not, stop early or not) and none waits on a collective the others skip.
Without a launcher there is one process and every function here is a plain call.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

T = TypeVar("T")


# How long a process waits at a collective for the others. While the main process evaluates (a whole dev set, on a
# CPU perhaps) the others wait at a broadcast; torch's default of 30 minutes would end a run with a long evaluation.
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def processes() -> PartialState:
    """accelerate's view of the processes of this run (one, unless started by a launcher); on CPU they talk
    through gloo."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=COLLECTIVE_TIMEOUT)


def check_global_batch(batch_size: int) -> None:
    """Refuse a global batch that does not split evenly over the processes (each takes an equal share)."""
    count = processes().num_processes
    if batch_size % count:
        raise ValueError(f"--batch-size {batch_size}: the global batch is split evenly over the {count} processes, "
                         f"so it must be a multiple of {count}")


def check_engine() -> None:
    """Refuse an accelerate configuration that would shard the model (FSDP, DeepSpeed, Megatron): the main process
    evaluates and saves alone, which a sharded model cannot do without the others (they would wait forever)."""
    engines = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
                                           ("Megatron-LM", "ACCELERATE_USE_MEGATRON_LM"))
               if os.environ.get(variable, "false").lower() in ("1", "true", "yes")]
    if engines:
        raise ValueError(f"accelerate is set to shard the model with {engines[0]} (its config or launch flags), which "
                         "deltactl train does not do: it replicates the model in each process (data parallel). "
                         "Launch with --multi_gpu and no FSDP/DeepSpeed config; to shard a frozen backbone in your "
                         "own loop, see docs/fsdp.md")


def on_main(action: Callable[[], T]) -> T:
    """Run ``action`` on the main process only; every process returns its result, or raises the error it raised
    (so a refusal on the main process stops all of them instead of leaving the others waiting)."""
    state = processes()
    outcome: list = [None]
    if state.is_main_process:
        try:
            outcome = [("value", action())]
        except Exception as err:  # noqa: BLE001 — handed to every process, then raised there
            outcome = [("error", err)]
            if state.num_processes > 1 and not _picklable(err):
                outcome = [("error", RuntimeError(f"{type(err).__name__}: {err}"))]
    if state.num_processes > 1:
        broadcast_object_list(outcome)
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _picklable(value) -> bool:
    """Whether ``value`` survives the trip to the other processes (some exceptions pickle but cannot be rebuilt)."""
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:  # noqa: BLE001 — anything pickle raises means: send a plain copy instead
        return False
    return True


def each_process(value: T) -> list[T]:
    """``value`` from every process, in rank order (a collective: every process must call it)."""
    state = processes()
    return gather_object([value]) if state.num_processes > 1 else [value]


def wait_for_everyone() -> None:
    processes().wait_for_everyone()


def cores_per_process() -> int:
    """The cores this process may use when the launcher started ``LOCAL_WORLD_SIZE`` processes on the machine."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
