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

Sharded weights (FSDP2's ``fully_shard``, see docs/fsdp.md): a weight held as a DTensor sharded on dim 0 of a 1-D
mesh (FSDP2's layout), or replicated, is merged shard by shard: the law runs on the DTensor (a δ outside the FSDP
groups counts as replicated), must give θ' in the same layout, and each rank writes its own rows; the frozen
weight is never gathered (only δ is, where FSDP sharded it). A law that would change the layout, another
placement, or a parameter a merge would have to create (BitFit's bias on a T5 linear layer) is refused, naming
what to do instead, and the weights already written by that merge are put back.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def write_weights(backbone, weight_laws) -> list:
    """θ ← law(θ) in place for every (site, attribute, law) of ``weight_laws``, into the weights as the backbone
    stores them (``Backbone.weight_target``); returns what ``restore_weights`` needs to put the replaced weights
    back: (module, attribute, the old weight or None where none existed)."""
    reshard(backbone.model)
    writes = [(site, *_resolve(backbone, site, attribute, law)) for site, attribute, law in weight_laws]
    saved = []
    try:
        with torch.no_grad():
            for site, module, attribute, law in writes:
                old = module._parameters.get(attribute)
                sharded = any(is_sharded(p) for p in module._parameters.values() if p is not None)
                new = _sharded_law(f"{site.name!r} ({type(module).__name__}.{attribute})", law, old) if sharded \
                    else law(old)
                if new is None:  # nothing to write (a scaling of a bias the layer does not have)
                    continue
                if old is None:  # a registered-but-absent parameter (nn.Linear(bias=False)): create it, layer's dtype
                    dtype = next((p.dtype for p in module._parameters.values() if p is not None), new.dtype)
                    module._parameters[attribute] = nn.Parameter(new.detach().to(dtype).clone(), requires_grad=False)
                    saved.append((module, attribute, None))
                else:
                    saved.append((module, attribute, old.detach().clone()))
                    if is_sharded(old):
                        old.to_local().copy_(new.to_local())  # this rank's rows, in the storage FSDP all-gathers
                    else:
                        old.copy_(new)
    except BaseException:
        restore_weights(saved)  # all or nothing: a refused or failed law leaves the weights as they were
        raise
    return saved


def restore_weights(saved: list) -> None:
    """Put back, bit for bit, the weights ``write_weights`` replaced (last written first). On a model sharded by
    FSDP2, ``reshard`` it first (FSDP2 keeps the root's parameters gathered after a forward pass)."""
    with torch.no_grad():
        for module, attribute, old in reversed(saved):
            if old is None:
                module._parameters[attribute] = None  # as it was: registered, holding None
            elif is_sharded(old):
                module._parameters[attribute].to_local().copy_(old.to_local())
            else:
                module._parameters[attribute].copy_(old)


# ---- sharded weights (FSDP2) ------------------------------------------------------------------------------------


def dtensor_type():
    """The DTensor class, or None where torch.distributed.tensor was never imported (then no tensor is one)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter FSDP2's ``fully_shard`` manages)."""
    kind = dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def reshard(model) -> None:
    """Put every FSDP2 module of ``model`` back in its sharded state (FSDP2 leaves the root's parameters gathered
    after a forward pass); local, no communication. Merging, saving and fingerprints read the sharded parameters."""
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)  # None: FSDP never imported
    for module in model.modules() if fsdp is not None else ():
        if isinstance(module, fsdp):
            module.reshard()


def row_sharding(tensor, what: str):
    """How a DTensor is laid out, as (mesh, sharded): ``sharded`` is True for rows split over a 1-D mesh (FSDP2's
    Shard(0)) and False for a replicated tensor. Any other layout is refused, naming it."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(tensor.placements)
    if tensor.device_mesh.ndim == 1 and placements in ((Shard(0),), (Replicate(),)):
        return tensor.device_mesh, placements == (Shard(0),)
    raise ValueError(
        f"{what} is a DTensor with placements {placements} on a {tensor.device_mesh.ndim}-D mesh; deltactl reads "
        "and writes sharded weights only as FSDP2 lays them out by default (Shard(0) on a 1-D mesh) or replicated. "
        "Shard the model with fully_shard's default placement, or gather the weights (unshard) first"
    )


def _sharded_law(where: str, law, old):
    """θ' = law(θ) for a parameter of a sharded module, in θ's layout, computed shard by shard."""
    from torch.distributed.tensor.experimental import implicit_replication

    if old is None:
        if law(None) is None:  # nothing to write (a scaling of a bias the layer does not have)
            return None
        raise ValueError(
            f"cannot merge into {where} of a sharded model: the merge would create that parameter, and FSDP manages "
            "only the parameters a module had when it was sharded. Merge before fully_shard, or keep the delta unmerged"
        )
    if not is_sharded(old):
        raise ValueError(f"cannot merge into {where}: FSDP left it outside its sharded parameters (ignored_params); "
                         "merge before fully_shard")
    row_sharding(old, f"the weight {where}")
    with implicit_replication():  # a δ kept out of the FSDP groups takes part as a replicated tensor
        new = law(old)
    if new is not None and not (
        is_sharded(new) and tuple(new.placements) == tuple(old.placements)
        and new.device_mesh == old.device_mesh and new.shape == old.shape
    ):
        raise ValueError(
            f"cannot merge into {where} of a sharded model: its law does not keep the weight's layout "
            f"{tuple(old.placements)} (it would need the whole weight on each rank). Merge before fully_shard, or "
            "gather the weights (e.g. FSDPModule.unshard()) and merge a copy of the unsharded model"
        )
    return new


def _resolve(backbone, site, attribute, law):
    """(module, attribute, law) for a law at a site: parameter sites name their parameter, others their module's."""
    module, attribute, law = backbone.weight_target(site, attribute, law)
    if attribute not in module._parameters:
        raise ValueError(
            f"cannot merge into {site.name!r}: its module {type(module).__name__} has no {attribute!r} to write "
            f"(e.g. T5's RMS layer norms have no bias); choose sites whose effect is a weight change"
        )
    return module, attribute, law
