"""Backbones: architecture families mapped onto canonical sites."""

from deltactl.backbones.base import Backbone, Trajectory
from deltactl.backbones.bert import BertBackbone
from deltactl.backbones.gpt2 import GPT2Backbone
from deltactl.backbones.llama import LlamaBackbone, MistralBackbone, Qwen2Backbone
from deltactl.backbones.t5 import T5Backbone

# Mistral and Qwen2 share the Llama architecture (RMS norms, rotary positions, grouped-query attention, gated MLP).
FAMILIES = {"t5": T5Backbone, "bert": BertBackbone, "gpt2": GPT2Backbone, "llama": LlamaBackbone,
            "mistral": MistralBackbone, "qwen2": Qwen2Backbone}


def backbone_for(model) -> Backbone:
    """The Backbone view of a transformers model, chosen by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"no deltactl backbone for model_type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type](model)


__all__ = ["Backbone", "BertBackbone", "GPT2Backbone", "LlamaBackbone", "MistralBackbone", "Qwen2Backbone",
           "Trajectory", "T5Backbone", "backbone_for"]
