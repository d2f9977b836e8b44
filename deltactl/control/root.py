"""Where attached deltas live on a model: the module ``model.deltactl`` (one controller per delta name) and its
``handles`` (name -> Delta, in attachment order). Everything else in the model is the base."""

from __future__ import annotations

ROOT = "deltactl"  # the attribute of the model under which attached controllers live


def deltas(model) -> dict:
    """The deltas attached to ``model``, by name, in attachment order."""
    root = model._modules.get(ROOT)
    return dict(root.handles) if root is not None else {}


def attached_deltas(model) -> dict:
    """The controllers attached to ``model``, by delta name."""
    root = model._modules.get(ROOT)
    return dict(root.items()) if root is not None else {}


def base_parameters(model):
    """The model's own parameters (not those of attached controllers), in a fixed order."""
    for name, param in model.named_parameters():
        if not name.startswith(ROOT + "."):
            yield param


def base_named_parameters(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(ROOT + ".")]
