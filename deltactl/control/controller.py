"""The Controller: δ (its parameters) and the control law G_θ(h, δ) it applies at each of its sites."""

from __future__ import annotations

from functools import partial

from torch import nn

from deltactl.backbones.sites import Site


class Controller(nn.Module):
    """Base of every controller: a set of sites and ``control(site, *payload)``, the law at each.

    The payload follows the site kind (see ``deltactl.backbones.sites``). The law reads δ only through
    ``self``'s parameters, so ``torch.func.functional_call`` on the model swaps δ like any weight.
    """

    def __init__(self, config, sites: list[Site]):
        super().__init__()
        self.config = config
        self.sites = list(sites)

    def control(self, site: str, *payload):
        raise NotImplementedError

    def controls(self) -> list[tuple[Site, object]]:
        """(site, law) pairs, in the order they are installed."""
        return [(site, partial(self.control, site.name)) for site in self.sites]

    def penalty(self):
        """R(δ), the regulariser the method adds to the training loss (a scalar tensor), or None."""
        return None

    def weight_laws(self) -> list[tuple[Site, str, object]]:
        """The control written as laws on base weights, for merging: (site, attribute, θ ↦ θ') triples.

        The attribute is one of the site module's parameters (``weight``, ``bias``); θ is None where the module
        has no such parameter yet (a T5 linear layer's bias). Methods whose effect is not a weight change (extra
        rows, bottleneck nets) have none.
        """
        raise NotMergeable(f"{self.config.method}'s control is not a change of weights, so it cannot be merged")


def site_key(name: str) -> str:
    """Module-dict key for a site name (module names may not contain dots)."""
    return name.replace(".", "__")


class PerSite(Controller):
    """A controller made of one independent module per site; ``module(x, y)`` or ``module(batch)`` is the law."""

    def __init__(self, config, sites: list[Site], layers: dict[str, nn.Module]):
        super().__init__(config, sites)
        self.layers = nn.ModuleDict({site_key(name): layer for name, layer in layers.items()})

    def control(self, site, *payload):
        return self.layers[site_key(site)](*payload)

    def controls(self):
        # The per-site module itself is the law: no name lookup on the hot path.
        return [(site, self.layers[site_key(site.name)]) for site in self.sites]

    def weight_laws(self):
        """Each per-site module's ``weight_laws(site)``: [(attribute, θ ↦ θ')] on the site's module."""
        laws = []
        for site in self.sites:
            layer = self.layers[site_key(site.name)]
            if not hasattr(layer, "weight_laws"):
                super().weight_laws()
            laws += [(site, attribute, law) for attribute, law in layer.weight_laws(site)]
        return laws


class NotMergeable(ValueError):
    """The control of this delta cannot be written into the base weights."""
