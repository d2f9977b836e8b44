"""Delta methods, one file each; importing a file registers its method."""

from deltactl.methods import adapter, bitfit, lora, prefix, prompt  # noqa: F401 - registration
from deltactl.methods.registry import REGISTRY, DeltaConfig, Method, get, make_config, register

__all__ = ["REGISTRY", "DeltaConfig", "Method", "get", "make_config", "register"]
