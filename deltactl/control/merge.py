"""Merge and unmerge: write a delta's effect into the base weights, θ ← G(θ), and restore them exactly.

``Delta.merge`` and ``Delta.unmerge`` call the two functions here, which only write weights: they know nothing of
deltas, so the state (merged or not, which hooks act) stays with the delta.

For methods whose control is a change of weights (LoRA, BitFit, IA3, LN-tuning, diff pruning, masks,
last-layer, selective and named-parameter tuning), the controller gives its control as laws on weights
(``Controller.weight_laws``). Merging applies them in place and stops the delta's hooks, so the merged model
runs at the base model's cost; its outputs equal the unmerged ones within the dtype's rounding. The weights
a merge replaces are kept (a copy of each), so ``unmerge`` restores them bit for bit in any dtype — an
update subtracted again would not be exact in bfloat16. A T5 linear layer has no bias: merging BitFit there
creates one, and unmerging removes it.

Half precision: δ stays float32 on a float16/bfloat16 base (``attach.delta_dtype``). A law forms θ' in float32
and merging rounds it once into the weight as it is, so the base weights keep their dtype (a bias created for
BitFit takes the layer's dtype). Parameter-site laws (LN-tuning, diff pruning, masks, last-layer, selective,
named) round θ' to θ's dtype in the forward pass too, so there merged and unmerged outputs are identical.
"""

from __future__ import annotations

import torch
from torch import nn


def write_weights(backbone, weight_laws) -> list:
    """θ ← law(θ) in place for every (site, attribute, law) of ``weight_laws``, into the weights as the backbone
    stores them (``Backbone.weight_target``); returns what ``restore_weights`` needs to put the replaced weights
    back: (module, attribute, the old weight or None where none existed)."""
    writes = [_resolve(backbone, site, attribute, law) for site, attribute, law in weight_laws]
    saved = []
    with torch.no_grad():
        for module, attribute, law in writes:
            old = module._parameters.get(attribute)
            new = law(old)
            if new is None:  # nothing to write (a scaling of a bias the layer does not have)
                continue
            if old is None:  # a registered-but-absent parameter (nn.Linear(bias=False)): create it in the layer's dtype
                dtype = next((p.dtype for p in module._parameters.values() if p is not None), new.dtype)
                module._parameters[attribute] = nn.Parameter(new.detach().to(dtype).clone(), requires_grad=False)
                saved.append((module, attribute, None))
            else:
                saved.append((module, attribute, old.detach().clone()))
                old.copy_(new)
    return saved


def restore_weights(saved: list) -> None:
    """Put back, bit for bit, the weights ``write_weights`` replaced (last written first)."""
    with torch.no_grad():
        for module, attribute, old in reversed(saved):
            if old is None:
                module._parameters[attribute] = None  # as it was: registered, holding None
            else:
                module._parameters[attribute].copy_(old)


def _resolve(backbone, site, attribute, law):
    """(module, attribute, law) for a law at a site: parameter sites name their parameter, others their module's."""
    module, attribute, law = backbone.weight_target(site, attribute, law)
    if attribute not in module._parameters:
        raise ValueError(
            f"cannot merge into {site.name!r}: its module {type(module).__name__} has no {attribute!r} to write "
            f"(e.g. T5's RMS layer norms have no bias); choose sites whose effect is a weight change"
        )
    return module, attribute, law
