"""Sharded backbones (FSDP2's ``fully_shard``) on CPU: two gloo processes, a tiny T5 in float32 (docs/fsdp.md).

The supported order is: attach (or load) δ on the whole model, then ``fully_shard`` each block and the root; δ
joins the root's FSDP group (sharded on dim 0, gathered for the forward pass, gradients averaged over the ranks).
One module-scoped run of the two processes computes everything (about 30 s on two cores, several seconds of it
importing torch in the two processes); the tests below read what it found. Each rank checks against an unsharded
copy of the same model with the same δ, in its own process.
"""

from __future__ import annotations

import json
import time
import traceback
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

WORLD = 2
TOL = 1e-5  # float32: sharded and unsharded sum in other orders
METHODS = {  # method -> options; each is attached, sharded and compared with the unsharded model
    "lora": {"r": 2}, "adapter": {"r": 3}, "ia3": {}, "prompt": {"length": 2}, "ln_tuning": {}, "dora": {"r": 2},
    "prefix": {"length": 2, "mid_dim": 6},
}
MERGED = ("ia3", "dora", "ln_tuning")  # merged beside LoRA
PREFIX_CASES = {  # case -> (prefix options, each stack's first block left in the root's group)
    "every memory": ({"length": 2, "mid_dim": 6}, False),
    "decoder self-attention": ({"length": 2, "reparameterize": False, "sites": ("decoder.*.attn.kv",)}, False),
    "block 1 only": ({"length": 3, "reparameterize": False, "sites": ("encoder.1.attn.kv", "decoder.1.*.kv")}, False),
    "first block in the root": ({"length": 2, "mid_dim": 6}, True),
}
TIMEOUT = 300  # seconds for the whole two-process run: a hang fails instead of blocking the suite


# ---- what runs in each process ------------------------------------------------------------------------------------


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    found: dict = {}
    try:
        _run(rank, Path(folder), found)
    except BaseException:
        found["error"] = traceback.format_exc()
        raise
    finally:
        Path(folder, f"rank{rank}.json").write_text(json.dumps(found))
    dist.barrier()
    dist.destroy_process_group()


def _shard(model, mesh, *, first_in_root=False, **options):
    """fully_shard each block, then the root (the order FSDP2 asks for). ``first_in_root``: leave each stack's first
    block in the root's group (the layout docs/fsdp.md once advised for T5 prefixes; it still works)."""
    from torch.distributed.fsdp import fully_shard

    for stack in (model.encoder, model.decoder):
        for i, block in enumerate(stack.block):
            if not (first_in_root and i == 0):
                fully_shard(block, mesh=mesh, **options)
    fully_shard(model, mesh=mesh, **options)
    return model


class _Gathers(TorchDispatchMode):
    """Records every all-gather (FSDP's, DTensor's, all_gather_object's): the floating-point inputs' shapes."""

    def __init__(self):
        super().__init__()
        self.float_shapes, self.count = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar the op into collectives on plain tensors, then see those
        if "gather" in str(func):
            self.count += 1
            leaves = tree_leaves((args, kwargs))
            tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
            self.float_shapes += [tuple(t.shape) for t in tensors[-1:] if t.is_floating_point()]  # the input
        return func(*args, **(kwargs or {}))


class _Watch:
    """Within it: all-gathers recorded (``_Gathers``), and every call of DTensor.full_tensor/redistribute on a frozen
    weight and of FSDPModule.unshard counted."""

    def __init__(self, frozen):
        self.frozen, self.frozen_calls, self.unshards = {id(p) for p in frozen}, [], 0

    def __enter__(self):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        self.saved = [(DTensor, "full_tensor"), (DTensor, "redistribute"), (FSDPModule, "unshard")]
        self.saved = [(cls, name, getattr(cls, name)) for cls, name in self.saved]
        watch = self

        def spy(cls, name, original):
            def call(this, *args, **kwargs):
                if name == "unshard":
                    watch.unshards += 1
                elif id(this) in watch.frozen:
                    watch.frozen_calls.append(name)
                return original(this, *args, **kwargs)
            return call

        for cls, name, original in self.saved:
            setattr(cls, name, spy(cls, name, original))
        self.gathers = _Gathers().__enter__()
        return self

    def __exit__(self, *exc):
        self.gathers.__exit__(*exc)
        for cls, name, original in self.saved:
            setattr(cls, name, original)


def _refusal(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return None


def _run(rank: int, folder: Path, found: dict) -> None:
    from torch.distributed.tensor import DTensor, Shard

    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    try:  # FSDP2 on CPU with gloo at all: shard, forward, backward
        from conftest import tiny_batch, tiny_t5
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        probe = _shard(tiny_t5(dtype=torch.float32).train(), mesh)
        probe(**tiny_batch(), labels=tiny_batch()["decoder_input_ids"]).loss.backward()
    except Exception as err:  # noqa: BLE001 - reported as the skip reason
        found["unsupported"] = f"{type(err).__name__}: {err}"
        return

    import deltactl as dc
    from deltactl.control.merge import reshard
    from deltactl.control.root import base_named_parameters

    def make(seed=0):  # 65 embedding rows: shards of 33 and 32 rows, so uneven sharding is covered
        return tiny_t5(seed=seed, dtype=torch.float32, vocab_size=65)

    batch = tiny_batch(batch=4)
    labels = batch["decoder_input_ids"]

    def rows(r):  # this rank's half of the batch
        return {k: v[2 * r:2 * r + 2] for k, v in batch.items()}

    def pair(method, options, seed=5, first_in_root=False):
        """An unsharded model and a sharded one (attached, then sharded) with the same random δ."""
        ref = make()
        torch.manual_seed(seed)
        ref_delta = dc.attach(ref, method, **options)
        with torch.no_grad():
            for p in ref_delta.parameters():
                p.add_(0.1 * torch.randn_like(p))
        model = make()
        delta = dc.attach(model, method, **options)
        delta.controller.load_state_dict(ref_delta.controller.state_dict())
        return ref, ref_delta, _shard(model, mesh, first_in_root=first_in_root), delta

    # 1. forward and δ's gradient, per method, on the same batch on both ranks
    found["forward"], found["grad"], found["delta_types"] = {}, {}, {}
    for method, options in METHODS.items():
        ref, ref_delta, model, delta = pair(method, options)
        out, ref_out = model(**batch, labels=labels), ref(**batch, labels=labels)
        found["forward"][method] = (out.logits - ref_out.logits).abs().max().item()
        out.loss.backward()
        ref_out.loss.backward()
        found["grad"][method] = max((whole(p.grad) - q.grad).abs().max().item()
                                    for p, q in zip(delta.parameters(), ref_delta.parameters()) if q.grad is not None)
        found["delta_types"][method] = sorted({type(p).__name__ for p in delta.parameters()})
        if method == "lora":  # switching off and detaching act on the sharded model too
            with dc.disabled(model), dc.disabled(ref):
                found["disabled_forward"] = (model(**batch).logits - ref(**batch).logits).abs().max().item()
            delta.detach()
            found["detached_forward"] = (model(**batch).logits - make()(**batch).logits).abs().max().item()

    # 2. one training step of LoRA, each rank on its half of the batch; the unsharded model on the mean of both
    ref, ref_delta, model, delta = pair("lora", {"r": 2})
    model.train()
    ref.train()
    model(**rows(rank), labels=rows(rank)["decoder_input_ids"]).loss.backward()
    sum(ref(**rows(r), labels=rows(r)["decoder_input_ids"]).loss for r in range(WORLD)).div(WORLD).backward()
    found["step_grad"] = max((whole(p.grad) - q.grad).abs().max().item()
                             for p, q in zip(delta.parameters(), ref_delta.parameters()))
    found["base_grads"] = sum(p.grad is not None for _, p in base_named_parameters(model))
    for params in (delta.parameters(), ref_delta.parameters()):
        torch.optim.AdamW(params, lr=1e-2).step()
    found["step_delta"] = max((whole(p) - q).abs().max().item()
                              for p, q in zip(delta.parameters(), ref_delta.parameters()))
    model.eval()
    ref.eval()
    with torch.no_grad():  # the same values on both, so the two saves can be compared byte for byte
        for p, q in zip(delta.parameters(), ref_delta.parameters()):
            q.copy_(whole(p))
    sharded_logits = model(**batch).logits.detach()
    found["after_step_forward"] = (sharded_logits - ref(**batch).logits).abs().max().item()

    # 3. save: δ gathered, frozen weights not; the same tensor file as the unsharded save
    reshard(model)  # FSDP2 keeps the root's parameters gathered after a forward pass; save reshards them too
    frozen = [p for _, p in base_named_parameters(model)]
    found["frozen_sharded"] = all(isinstance(p, DTensor) for p in frozen)
    delta_locals = Counter(tuple(local(p).shape) for p in delta.parameters())
    with _Watch(frozen) as watch:
        delta.save(folder / "sharded")
    found["save_frozen_calls"], found["save_unshards"] = watch.frozen_calls, watch.unshards
    found["save_float_gathers"] = Counter(watch.gathers.float_shapes) == delta_locals
    found["save_gathers_detail"] = repr(watch.gathers.float_shapes)
    found["sharded_fingerprint"] = dc.fingerprint(model)
    found["rows_fingerprint_unsharded"] = dc.fingerprint(ref, scheme="sha256-rows")
    if rank == 0:
        ref_delta.save(folder / "unsharded")
    torch.distributed.barrier()
    s_meta, u_meta = (json.loads((folder / f / "delta.json").read_text()) for f in ("sharded", "unsharded"))
    found["tensor_bytes_equal"] = (folder / "sharded" / "delta.safetensors").read_bytes() == (
        folder / "unsharded" / "delta.safetensors").read_bytes()
    found["meta_equal_but_base"] = {k: v for k, v in s_meta.items() if k not in ("base", "sha256")} == {
        k: v for k, v in u_meta.items() if k not in ("base", "sha256")}
    found["saved_base"], found["unsharded_base"] = s_meta["base"], u_meta["base"]
    found["whole_fingerprint"] = dc.fingerprint(ref)

    # 4. load: the sharded save onto an unsharded model; the unsharded save, then shard (the supported order);
    # onto a sharded model (attached outside FSDP) only with a row fingerprint; not onto another base
    fresh = make()
    loaded = dc.load(fresh, folder / "sharded")
    found["load_unsharded_tensors"] = all(torch.equal(v, ref_delta.controller.state_dict()[k])
                                          for k, v in loaded.controller.state_dict().items())
    found["load_unsharded_forward"] = (fresh(**batch).logits - sharded_logits).abs().max().item()
    fresh = make()
    dc.load(fresh, folder / "unsharded")
    found["load_then_shard_forward"] = (_shard(fresh, mesh)(**batch).logits - sharded_logits).abs().max().item()
    fresh = _shard(make(), mesh)
    found["load_whole_onto_sharded"] = _refusal(lambda: dc.load(fresh, folder / "unsharded"))
    found["refused_load_left_model"] = not hasattr(fresh, "deltactl")
    dc.load(fresh, folder / "sharded")
    found["load_rows_onto_sharded_forward"] = (fresh(**batch).logits - sharded_logits).abs().max().item()
    other = _shard(make(seed=1), mesh)
    found["load_other_base"] = _refusal(lambda: dc.load(other, folder / "sharded"))

    # 5. merge LoRA shard by shard: the same outputs and weights as the unsharded merge, δ gathered at most,
    # frozen weights never; unmerge puts back each rank's rows bit for bit
    sites = [model.get_submodule(n) for n, _ in model.named_modules() if n.endswith(("SelfAttention.q",
                                                                                       "SelfAttention.v"))]
    before = [local(m.weight).clone() for m in sites]
    ref_delta.merge()
    with _Watch(frozen) as watch:
        delta.merge()
    found["merge_frozen_calls"], found["merge_unshards"] = watch.frozen_calls, watch.unshards
    found["merge_float_gathers_delta_only"] = set(watch.gathers.float_shapes) <= set(delta_locals)
    found["merge_layout_kept"] = all(isinstance(m.weight, DTensor) and m.weight.placements == (Shard(0),)
                                     for m in sites)
    found["merged_forward"] = (model(**batch).logits - ref(**batch).logits).abs().max().item()
    ref_sites = [ref.get_submodule(n) for n, _ in ref.named_modules() if n.endswith(("SelfAttention.q",
                                                                                     "SelfAttention.v"))]
    found["merged_weights"] = max((whole(m.weight) - r.weight).abs().max().item() for m, r in zip(sites, ref_sites))
    delta.save(folder / "merged")  # the fingerprint of the unmerged base, also while merged
    found["merged_save_base"] = json.loads((folder / "merged" / "delta.json").read_text())["base"]
    delta.unmerge()
    found["unmerge_exact"] = all(torch.equal(local(m.weight), b) for m, b in zip(sites, before))
    found["other_merges"] = {}
    for method in MERGED:  # other weight laws, each kept in rows: scalings of rows or columns, a norm per row
        ref, ref_delta, model, delta = pair(method, METHODS[method])
        reshard(model)
        weights = [p for _, p in base_named_parameters(model)]
        before = [local(p).clone() for p in weights]
        ref_delta.merge()
        with _Watch(weights) as watch:
            delta.merge()
        merged = (model(**batch).logits - ref(**batch).logits).abs().max().item()
        delta.unmerge()
        found["other_merges"][method] = {
            "forward": merged, "frozen_calls": watch.frozen_calls, "unshards": watch.unshards,
            "exact_unmerge": all(torch.equal(local(p), b) for p, b in zip(weights, before)),
        }

    # 6. refusals: a merge that would create a parameter (BitFit's bias of a T5 linear layer), and a layout other
    # than FSDP2's rows; the weights are left as they were
    _, _, model, delta = pair("bitfit", {"sites": ("*.q",)})
    q = [local(m.weight).clone() for m in (model.encoder.block[0].layer[0].SelfAttention.q,)]
    found["merge_creates"] = _refusal(delta.merge)
    found["merge_creates_left"] = torch.equal(local(model.encoder.block[0].layer[0].SelfAttention.q.weight), q[0]) \
        and not delta.merged and model.encoder.block[0].layer[0].SelfAttention.q.bias is None
    ref = make()
    delta = dc.attach(ref, "lora", r=2)
    columns = _shard(ref, mesh, shard_placement_fn=lambda p: Shard(p.ndim - 1))
    found["merge_columns"] = _refusal(delta.merge)
    found["save_columns"] = _refusal(lambda: delta.save(folder / "columns"))

    # 7. a δ attached after fully_shard is outside FSDP: replicated, its gradients not averaged; a save refuses a δ
    # that differs between the ranks
    model = _shard(make(), mesh)
    delta = dc.attach(model, "lora", r=2)
    found["after_shard_types"] = sorted({type(p).__name__ for p in delta.parameters()})
    delta.save(folder / "after")  # the same δ on both ranks (same seed): saved
    found["after_saved"] = (folder / "after" / "delta.json").is_file()
    with torch.no_grad():
        next(iter(delta.parameters())).add_(rank)
    found["diverged"] = _refusal(lambda: delta.save(folder / "diverged"))
    del columns

    # 8. T5 prefixes with every block its own FSDP unit: the memory rows' relative position bias comes from the table
    # block 0 copies while it runs, so later blocks never read block 0's resharded weights. Placements: every
    # memory; decoder self-attention only (PEFT's); rows in block 1 only (block 0 holds none, but still supplies the
    # table); and each stack's first block in the root's group
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    found["prefix_units"] = {}
    for case, (options, first_in_root) in PREFIX_CASES.items():
        ref, ref_delta, model, delta = pair("prefix", options, first_in_root=first_in_root)
        register_fsdp_forward_method(model, "generate")  # generate calls the encoder outside the root's forward
        blocks = [*model.encoder.block, *model.decoder.block]
        units = sum(isinstance(b, FSDPModule) for b in blocks)
        with torch.no_grad():
            forward = (model(**batch).logits - ref(**batch).logits).abs().max().item()
            effect = (ref(**batch).logits - make()(**batch).logits).abs().max().item()
        model.train()  # dropout is 0: train mode changes nothing but the mode FSDP and the hooks run in
        ref.train()
        model(**rows(rank), labels=rows(rank)["decoder_input_ids"]).loss.backward()
        ref_loss = sum(ref(**rows(r), labels=rows(r)["decoder_input_ids"]).loss for r in range(WORLD)).div(WORLD)
        ref_loss.backward()
        grad = max((whole(p.grad) - q.grad).abs().max().item()
                   for p, q in zip(delta.parameters(), ref_delta.parameters()) if q.grad is not None)
        model.eval()
        ref.eval()
        with torch.no_grad():  # greedy decoding: the decoder runs token by token with a cache (past > 0)
            generate = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "output_scores": True,
                        "return_dict_in_generate": True}
            ours, theirs = model.generate(**generate), ref.generate(**generate)
        scores, ref_scores = torch.stack(ours.scores), torch.stack(theirs.scores)
        finite = ref_scores.isfinite()
        found["prefix_units"][case] = {
            "units": units, "blocks": len(blocks),
            "forward": forward, "grad": grad, "prefix_effect": effect,
            "generate_scores": (scores - ref_scores)[finite].abs().max().item(),
            "generate_same": torch.equal(ours.sequences, theirs.sequences) and torch.equal(scores.isfinite(), finite),
        }


# ---- the tests ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Both ranks' findings (a list indexed by rank); skips where FSDP2 on CPU with gloo does not work."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        pytest.skip(f"this torch has no FSDP2 fully_shard: {err}")
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("fsdp")
    start = time.monotonic()
    context = mp.start_processes(_worker, args=(str(folder),), nprocs=WORLD, join=False, start_method="spawn")
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > TIMEOUT:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the two FSDP processes did not finish in {TIMEOUT} s")
    except mp.ProcessRaisedException as err:
        pytest.fail(f"an FSDP process failed:\n{err}")
    except mp.ProcessExitedException as err:
        reports = [folder / f"rank{r}.json" for r in range(WORLD)]
        errors = [json.loads(p.read_text()).get("error") for p in reports if p.is_file()]
        pytest.fail(f"an FSDP process exited: {err}\n{next((e for e in errors if e), '')}")
    found = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(WORLD)]
    unsupported = {f.get("unsupported") for f in found} - {None}
    if unsupported:
        pytest.skip(f"FSDP2 fully_shard on CPU with gloo does not work in torch {torch.__version__}: "
                    f"{unsupported.pop()}")
    return found


def test_sharded_forward_and_gradient_equal_the_unsharded_model(run):
    for found in run:
        assert set(found["forward"]) == set(METHODS)
        for method in METHODS:
            assert found["forward"][method] < TOL, method
            assert found["grad"][method] < TOL, method
            assert found["delta_types"][method] == ["DTensor"], method  # δ joined the root's FSDP group
        assert found["disabled_forward"] < TOL and found["detached_forward"] < TOL


def test_t5_prefixes_with_every_block_its_own_unit_equal_the_unsharded_model(run):
    """Forward, δ's gradient averaged over the ranks' halves of the batch, and greedy decoding with a cache, each
    equal to the unsharded model's, with block 0 sharded like every other block."""
    for found in run:
        assert set(found["prefix_units"]) == set(PREFIX_CASES)
        for case, (_, first_in_root) in PREFIX_CASES.items():
            got = found["prefix_units"][case]
            assert got["units"] == got["blocks"] - (2 if first_in_root else 0), case
            assert got["prefix_effect"] > 1e-3, case  # the rows change the output: the comparison is not vacuous
            assert got["forward"] < TOL and got["grad"] < TOL, (case, got)
            assert got["generate_scores"] < TOL and got["generate_same"], (case, got)


def test_a_training_step_averages_delta_gradients_over_the_ranks(run):
    for found in run:
        assert found["step_grad"] < TOL  # each rank's half-batch gradient, averaged = the full batch's
        assert found["base_grads"] == 0  # the frozen weights get no gradient
        assert found["step_delta"] < TOL  # AdamW steps δ identically
        assert found["after_step_forward"] < TOL


def test_saving_gathers_delta_only_and_writes_the_unsharded_tensor_file(run):
    for found in run:
        assert found["frozen_sharded"]
        assert found["save_frozen_calls"] == [] and found["save_unshards"] == 0
        assert found["save_float_gathers"], found["save_gathers_detail"]  # one all-gather per δ tensor, no other
        assert found["tensor_bytes_equal"]
        assert found["meta_equal_but_base"]
        # the base is recorded by rows: the same digest as the unsharded model's, however many ranks
        assert found["saved_base"] == found["rows_fingerprint_unsharded"] == found["sharded_fingerprint"]
        assert found["saved_base"]["scheme"] == "sha256-rows"
        assert found["unsharded_base"] == found["whole_fingerprint"] and "scheme" not in found["unsharded_base"]
        assert found["merged_save_base"] == found["saved_base"]


def test_load_in_the_supported_order_and_onto_sharded_models(run):
    for found in run:
        assert found["load_unsharded_tensors"]
        assert found["load_unsharded_forward"] < TOL
        assert found["load_then_shard_forward"] < TOL
        assert "fully_shard" in found["load_whole_onto_sharded"] and "gather" in found["load_whole_onto_sharded"]
        assert found["refused_load_left_model"]
        assert found["load_rows_onto_sharded_forward"] < TOL
        assert "another one" in found["load_other_base"]


def test_merge_writes_each_ranks_rows_without_gathering_frozen_weights(run):
    for found in run:
        assert found["merge_frozen_calls"] == [] and found["merge_unshards"] == 0
        assert found["merge_float_gathers_delta_only"]
        assert found["merge_layout_kept"]
        assert found["merged_forward"] < TOL
        assert found["merged_weights"] < TOL
        assert found["unmerge_exact"]
        assert set(found["other_merges"]) == set(MERGED)
        for method, merged in found["other_merges"].items():
            assert merged["forward"] < TOL, method
            assert merged["frozen_calls"] == [] and merged["unshards"] == 0, method
            assert merged["exact_unmerge"], method


def test_merges_that_need_whole_weights_are_refused(run):
    for found in run:
        assert "would create" in found["merge_creates"] and "before fully_shard" in found["merge_creates"]
        assert found["merge_creates_left"]
        assert "Shard(0)" in found["merge_columns"] and "Shard(dim=1)" in found["merge_columns"]
        assert "Shard(0)" in found["save_columns"]


def test_a_delta_attached_after_sharding_is_replicated_and_checked_at_save(run):
    for found in run:
        assert found["after_shard_types"] == ["Parameter"]
        assert found["after_saved"]
        assert "differs between the ranks" in found["diverged"] and "before fully_shard" in found["diverged"]


def test_the_row_fingerprint_sees_a_change_in_any_single_base_weight():
    """In one process: the row fingerprint (what sharded saves record) changes with any single weight entry, and
    is not the whole-weight one."""
    from conftest import tiny_t5

    import deltactl as dc
    from deltactl.control.root import base_named_parameters

    model = tiny_t5(dtype=torch.float32)
    reference = dc.fingerprint(model, scheme="sha256-rows")
    assert reference["scheme"] == "sha256-rows" and reference["sha256"] != dc.fingerprint(model)["sha256"]
    assert {k: v for k, v in reference.items() if k not in ("sha256", "scheme")} == {
        k: v for k, v in dc.fingerprint(model).items() if k != "sha256"}
    with torch.no_grad():
        for name, param in base_named_parameters(model):
            flat = param.view(-1)
            kept = flat[-1].clone()
            flat[-1] = kept + 1
            assert dc.fingerprint(model, scheme="sha256-rows")["sha256"] != reference["sha256"], name
            flat[-1] = kept
    assert dc.fingerprint(model, scheme="sha256-rows") == reference
    with pytest.raises(ValueError, match="unknown fingerprint scheme"):
        dc.fingerprint(model, scheme="md5")
