"""deltactl: delta tuning of pre-trained transformers as control of their hidden-state dynamics."""

from deltactl.backbones import backbone_for
from deltactl.control.accounting import count
from deltactl.control.attach import Delta, attach, disable_all, disabled, penalty, use
from deltactl.control.combinators import chain, sum  # noqa: A004 - deltactl.sum is the sum combinator
from deltactl.control.controller import Controller, PerSite
from deltactl.control.io import fingerprint
from deltactl.control.load import load
from deltactl.control.peft_format import export_peft, import_peft
from deltactl.control.root import attached_deltas, deltas
from deltactl.control.rows import per_row
from deltactl.control.tree import tree
from deltactl.methods import REGISTRY, DeltaConfig, make_config, register
from deltactl.methods.adapter import AdapterConfig
from deltactl.methods.arithmetic import combine, negate
from deltactl.methods.bitfit import BitFitConfig
from deltactl.methods.lora import LoRAConfig
from deltactl.methods.prefix import PrefixConfig
from deltactl.methods.prompt import PromptConfig

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "BitFitConfig", "Controller", "Delta", "DeltaConfig", "LoRAConfig", "PerSite", "PrefixConfig",
    "PromptConfig", "REGISTRY", "attach", "attached_deltas", "backbone_for", "chain", "count", "fingerprint",
    "load", "make_config", "register", "sum", "tree", "deltas", "use", "disable_all", "disabled", "penalty",
    "export_peft", "import_peft", "per_row", "combine", "negate",
]
