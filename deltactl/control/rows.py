"""Mixed-delta batches: each row of a batch runs under the delta named for it (or none), in one forward pass.

``with per_row(model, ["sst2", "mnli", None, "sst2"]):`` makes row 0 and 3 run under the delta ``sst2``, row 1
under ``mnli`` and row 2 under the pre-trained model, for ``model(...)`` and ``model.generate(...)`` alike (as
PEFT's ``adapter_names=``). Outputs equal running each row alone under its delta.

Each delta's law at a site is applied to its own rows only: the rows are gathered, the law maps them, and the
result is put back in place; other rows pass through unchanged. This needs laws that map a batch row by row, so it
is open to deltas whose sites are activations (linear layers' outputs or inputs, norms, branches, states: LoRA,
IA3, BitFit, adapters, …). Prefixes and prompts add attention memory or input rows whose number is fixed per
delta, and parameter laws change weights every row shares: those are refused with a message.

Batches that grow by whole copies of each row (beam search, ``num_return_sequences``) keep each copy with its row.
"""

from __future__ import annotations

import difflib

import torch

from deltactl.backbones.sites import OUTPUT_KINDS
from deltactl.control.attach import reinstall
from deltactl.control.root import deltas


class per_row:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with per_row(model, names):`` runs row i of every batch under the delta ``names[i]`` (None: no delta).

    Deltas not named in ``names`` do not act inside the block; on exit the model's deltas act as before.
    """

    def __init__(self, model, names):
        self.model = model
        self.names = list(names)
        attached = deltas(model)
        for name in dict.fromkeys(n for n in self.names if n is not None):
            if name not in attached:
                close = difflib.get_close_matches(str(name), list(attached), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                listed = ", ".join(attached) or "none"
                raise ValueError(f"no delta named {name!r} on this model{hint} (attached: {listed})")
            delta = attached[name]
            if delta.merged:
                raise ValueError(f"delta {name!r} is merged into the weights, so it acts on every row; unmerge it to "
                                 "run it on some rows only")
            unfit = sorted({s.kind for s, _ in delta.controller.controls() if s.kind not in OUTPUT_KINDS})
            if unfit:
                raise ValueError(
                    f"delta {name!r} ({delta.config.method}) acts at {' and '.join(unfit)} sites, which add rows or "
                    f"change weights shared by the whole batch; per-row deltas need laws on activations "
                    f"(sites of kind {', '.join(sorted(OUTPUT_KINDS))}: LoRA, IA3, BitFit, adapters, …)"
                )
        merged = [n for n, d in attached.items() if d.merged and n not in self.names]
        if merged:
            raise ValueError(f"delta {merged[0]!r} is merged into the weights and would act on every row; unmerge it")
        device = next(model.parameters()).device
        self.delta_rows = {
            name: torch.tensor([i for i, n in enumerate(self.names) if n == name], dtype=torch.long, device=device)
            for name in dict.fromkeys(n for n in self.names if n is not None)
        }

    def __enter__(self):
        attached = deltas(self.model)
        for delta in reversed(list(attached.values())):  # take every law out, as reinstall does
            for handle in reversed(delta._handles):
                handle.remove()
            delta._handles = []
        try:
            for delta in attached.values():  # in attachment order, so laws at one site compose as they would
                rows = self.delta_rows.get(delta.name)
                if rows is None:
                    continue
                for site, law in delta.controller.controls():
                    delta._handles.append(delta.backbone.hook(site, _on_rows(law, rows, len(self.names))))
        except BaseException:
            reinstall(self.model)
            raise
        return self.model

    def __exit__(self, *exc):
        reinstall(self.model)


def _on_rows(law, rows: torch.Tensor, batch: int):
    """``law`` applied to the rows ``rows`` of a batch of ``batch`` rows (or of a whole multiple of it, each row
    repeated in place, as beam search and ``num_return_sequences`` expand a batch); the other rows unchanged."""

    def select(value):
        if value.shape[0] % batch:
            raise ValueError(f"per_row was given {batch} delta names, but a batch of {value.shape[0]} rows reached "
                             "the model; give one name per row")
        copies = value.shape[0] // batch
        rows_here = rows.to(value.device)  # a no-op once the model and its batches share a device
        return (rows_here[:, None] * copies + torch.arange(copies, device=value.device)[None, :]).reshape(-1)

    if getattr(law, "acts_on", "output") == "input":
        def control(x):
            index = select(x)
            return x.index_copy(0, index, law(x.index_select(0, index)))
    else:
        def control(x, y):
            index = select(y)
            part_x = x.index_select(0, index) if torch.is_tensor(x) else x
            return y.index_copy(0, index, law(part_x, y.index_select(0, index)))
        control.acts_on = "output"
    if getattr(law, "acts_on", None) == "input":
        control.acts_on = "input"
    see = getattr(law, "see_tokens", None)
    if see is not None:  # a law that reads the pass's attention mask (backbones/base.py) sees its rows' mask
        control.see_tokens = lambda mask, past: see(None if mask is None else mask.index_select(0, select(mask)), past)
    return control
