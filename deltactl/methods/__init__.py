"""Delta methods, one file each; importing a file registers its method."""

from deltactl.control.registry import REGISTRY, DeltaConfig, Method, get, make_config, make_example, register
from deltactl.methods import (  # noqa: F401 - registration
    adapter,
    bitfit,
    compacter,
    diff_pruning,
    dora,
    ia3,
    last_layer,
    ln_tuning,
    lora,
    lowrank_adapter,
    mask,
    named_parameters,
    parallel_adapter,
    pfeiffer,
    prefix,
    prompt,
    reft,
    selective,
    vera,
)

__all__ = ["REGISTRY", "DeltaConfig", "Method", "get", "make_config", "make_example", "register"]
