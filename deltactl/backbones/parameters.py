"""Parameter sites: every weight of the backbone as a place where a law θ ↦ θ' acts (specification methods).

A parameter site is named after the canonical site of the module holding it (``encoder.3.attn.q.weight``,
``encoder.0.ffn.ln.weight``, BERT's ``encoder.embed_ln.bias``); a parameter of any other module keeps its
transformers name below the backbone's root (``shared.weight``, ``embeddings.word_embeddings.weight`` in BERT,
``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight``).
A parameter tied to several modules (T5 v1.0's embedding and LM head) is one site whose law acts in each of them.

Mechanism: a pre-hook on each owning module puts θ' = law(θ) in place of the parameter for that call, and a
forward hook that runs even when the forward raises puts θ back. The model's parameters are never written, so
gradients reach δ through θ', ``torch.func.functional_call`` can swap θ or δ, and removing the handle leaves the
model exactly as it was. Several laws at one parameter apply in the order they were installed.
"""

from __future__ import annotations

import weakref

from torch import nn

from deltactl.backbones.sites import Site

EXCLUDED_ROOTS = ("deltactl",)  # attached controllers are not part of the backbone


def parameter_sites(model: nn.Module, root: str, canonical: dict[str, str]) -> list[Site]:
    """One site per distinct parameter under ``root``; ``canonical`` maps module paths to canonical site names."""
    base = model.get_submodule(root) if root else model
    prefix = f"{root}." if root else ""
    owners: dict[int, list[tuple[str, str]]] = {}
    params, names = {}, {}
    for path, module in base.named_modules():  # each module once, under its first name
        full = prefix + path if path else root
        if full.split(".")[0] in EXCLUDED_ROOTS:
            continue
        for pname, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((full, pname))
                params[id(param)] = param
                names.setdefault(id(param), f"{canonical[full]}.{pname}" if full in canonical else f"{path}.{pname}")
    sites = []
    for key, places in owners.items():
        module, pname = places[0]
        name = names[key]
        dims = {"shape": tuple(params[key].shape), "param": pname, "owners": tuple(places)}
        sites.append(Site(name, "parameter", module, dims))
    return sites


# One swap per owning module, shared by every law acting on its parameters; kept outside the module.
_SWAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Swap:
    """θ' = lawₙ(…law₁(θ)) in place of a module's parameters for the length of its forward."""

    def __init__(self, module: nn.Module):
        self.laws: dict[str, list] = {}
        self.saved: list[dict] = []  # a stack: a module may be re-entered (it never is in T5/BERT, but be safe)
        self.handles = [
            module.register_forward_pre_hook(self.put),
            module.register_forward_hook(self.restore, always_call=True),
        ]

    def put(self, module, args):
        saved = {}
        for pname, laws in self.laws.items():
            value = saved[pname] = module._parameters[pname]
            for law in laws:
                value = law(value)
            module._parameters[pname] = value
        self.saved.append(saved)

    def restore(self, module, args, output):
        for pname, value in self.saved.pop().items():
            module._parameters[pname] = value


class ParameterHandle:
    """Makes ``law(θ)`` act in every module owning the site's parameter; ``remove()`` undoes it exactly."""

    def __init__(self, model: nn.Module, site: Site, law):
        self.places = [(model.get_submodule(path), pname) for path, pname in site.dims["owners"]]
        self.law = law
        for module, pname in self.places:
            swap = _SWAPS.get(module)
            if swap is None:
                swap = _SWAPS[module] = _Swap(module)
            swap.laws.setdefault(pname, []).append(law)

    def remove(self):
        for module, pname in self.places:
            swap = _SWAPS[module]
            laws = swap.laws[pname]
            laws.remove(self.law)
            if not laws:
                del swap.laws[pname]
            if not swap.laws:
                for handle in swap.handles:
                    handle.remove()
                del _SWAPS[module]
