"""PEFT's saved format: export deltactl LoRA, IA3, prompt- and prefix-tuning deltas as PEFT adapters, and
import PEFT adapters as deltactl deltas.

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``; its tensors are named
``base_model.model.<module path>.<lora_A.weight | lora_B.weight | ia3_l>`` for LoRA and IA3, and
``prompt_embeddings`` for prompt- and prefix-tuning; DoRA (a LoRA with ``use_dora``) adds
``<module path>.lora_magnitude_vector``, its m. An export loads with ``PeftModel.from_pretrained`` on the
same base model and computes the same outputs.

What the format cannot hold is refused, not approximated: PEFT's prefix-tuning on T5 acts in decoder
self-attention only. Its embedding holds 2N key/value slots, N the adapter's ``num_layers``, and decoder layer
l reads slots 4l mod 2N and 4l+1 mod 2N, so with N even layers l and l + N/2 share rows (BERT: layer l reads
slots 2l and 2l+1). PEFT fills N from the model's ``num_hidden_layers``, which for T5 is the encoder's depth, not
the decoder's; N must be at least the depth of the stack the prefix acts in (PEFT's own forward fails
otherwise), and extra slots go unread. Import follows the adapter's N; export writes N = that depth. A deltactl
prefix exports only if it sits exactly where PEFT's does and its rows agree where PEFT's layout ties them. A
reparameterised prefix exports its rows (what PEFT itself saves for inference), with ``prefix_projection`` off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from deltactl.control.attach import Delta, attach
from deltactl.control.controller import site_key
from deltactl.control.registry import make_config

CONFIG, WEIGHTS, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
SUPPORTED = ("lora", "ia3", "prompt", "prefix")  # lora with its variants: rsLoRA, PiSSA/OLoRA init, and dora


def export_peft(delta: Delta, folder) -> Path:
    """Write ``delta`` to ``folder`` in PEFT's format. Args: delta an attached LoRA/DoRA/IA3/prompt/prefix delta."""
    method = delta.config.method
    if method not in _EXPORT:
        raise ValueError(f"PEFT export covers {', '.join(SUPPORTED)}; this delta is {method!r}")
    config, tensors = _EXPORT[method](delta)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"base_model_name_or_path": None, "revision": None, "inference_mode": True, **config}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def import_peft(model, folder, *, name: str | None = None) -> Delta:
    """Attach the PEFT adapter saved in ``folder`` to ``model`` as a deltactl delta (LoRA/DoRA, IA3, prompt, prefix)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder: expected {CONFIG} and {WEIGHTS}")
    config = json.loads((folder / CONFIG).read_text())
    kind = config.get("peft_type")
    if kind not in _IMPORT:
        raise ValueError(f"PEFT import covers {', '.join(_IMPORT)}; {folder / CONFIG} has peft_type {kind!r}")
    return _IMPORT[kind](model, config, load_file(str(folder / WEIGHTS)), name)


def _task_type(delta) -> str:
    model = delta.model
    if getattr(model.config, "is_encoder_decoder", False) and getattr(model, "decoder", None) is not None:
        return "SEQ_2_SEQ_LM"
    return "FEATURE_EXTRACTION"


def _layers(delta):
    return [(site, delta.controller.layers[site_key(site.name)]) for site in delta.controller.sites]


# ---- LoRA --------------------------------------------------------------------------------------------------------


def _export_lora(delta):
    """A PiSSA/OLoRA delta, s (BA − B₀A₀), exports as PEFT converts one for saving: a plain LoRA of rank 2r with
    A' = [A; A₀], B' = [B, −B₀] and α doubled (×√2 with rsLoRA), so that its scale stays s."""
    cfg = delta.config
    init = getattr(cfg, "init", "default")
    tensors = {}
    for site, layer in _layers(delta):
        A, B = layer.A, layer.B
        if init != "default":
            A, B = torch.cat([A, layer.A0]), torch.cat([B, -layer.B0], dim=1)
        tensors[f"{PREFIX}{site.module}.lora_A.weight"] = A
        tensors[f"{PREFIX}{site.module}.lora_B.weight"] = B
    r, alpha = cfg.r, cfg.alpha
    if init != "default":
        r, alpha = 2 * r, alpha * (2**0.5 if cfg.rslora else 2)
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "lora_dropout": cfg.dropout,
        "target_modules": [s.module for s in delta.controller.sites], "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_rslora": cfg.rslora, "use_dora": cfg.method == "dora",
    }
    if cfg.method == "dora":  # PEFT's lora_magnitude_vector is DoRA's m
        for site, layer in _layers(delta):
            tensors[f"{PREFIX}{site.module}.lora_magnitude_vector"] = layer.m
    return config, tensors


def _import_lora(model, config, tensors, name):
    if config.get("bias", "none") != "none":
        raise ValueError("only LoRA with bias='none' imports")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError("per-module ranks or alphas (rank_pattern, alpha_pattern) do not import")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora")):
        raise ValueError(f"this adapter was saved with init_lora_weights={init!r}: its base weights were replaced "
                         "by W − s B₀A₀, which the adapter folder does not hold; save it from PEFT with "
                         "path_initial_model_for_weight_conversion to get a plain LoRA")
    modules = _modules_with(tensors, ".lora_A.weight")
    method = "dora" if config.get("use_dora") else "lora"
    delta = _attach_on_modules(model, method, modules, name, r=config["r"], alpha=float(config["lora_alpha"]),
                               dropout=float(config.get("lora_dropout", 0.0)),
                               rslora=bool(config.get("use_rslora", False)))
    with torch.no_grad():
        for site, layer in _layers(delta):
            layer.A.copy_(tensors[f"{PREFIX}{site.module}.lora_A.weight"])
            layer.B.copy_(tensors[f"{PREFIX}{site.module}.lora_B.weight"])
            if method == "dora":
                layer.m.copy_(tensors[f"{PREFIX}{site.module}.lora_magnitude_vector"])
    return delta


# ---- IA3 ---------------------------------------------------------------------------------------------------------


def _export_ia3(delta):
    tensors, feedforward = {}, []
    for site, layer in _layers(delta):
        on_input = layer.acts_on == "input"
        tensors[f"{PREFIX}{site.module}.ia3_l"] = layer.l[None, :] if on_input else layer.l[:, None]
        if on_input:
            feedforward.append(site.module)
    config = {
        "peft_type": "IA3", "task_type": None, "target_modules": [s.module for s in delta.controller.sites],
        "feedforward_modules": feedforward, "fan_in_fan_out": False, "init_ia3_weights": True,
    }
    return config, tensors


def _import_ia3(model, config, tensors, name):
    modules = _modules_with(tensors, ".ia3_l")
    feedforward = [m for m in modules if tensors[f"{PREFIX}{m}.ia3_l"].shape[0] == 1]
    delta = _attach_on_modules(model, "ia3", modules, name, feedforward=tuple(_names(model, feedforward)))
    with torch.no_grad():
        for site, layer in _layers(delta):
            layer.l.copy_(tensors[f"{PREFIX}{site.module}.ia3_l"].reshape(-1))
    return delta


# ---- prompt-tuning -----------------------------------------------------------------------------------------------


def _export_prompt(delta):
    rows = delta.controller.layers["encoder__embed"].rows
    submodules = 2 if _task_type(delta) == "SEQ_2_SEQ_LM" else 1
    # For seq2seq PEFT allocates a second block of rows for the decoder that prompt-tuning never reads.
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": _task_type(delta), "num_virtual_tokens": rows.shape[0],
        "token_dim": rows.shape[1], "num_transformer_submodules": submodules, "prompt_tuning_init": "RANDOM",
        **_shape_fields(delta.model),
    }
    return config, {"prompt_embeddings": rows.detach().repeat(submodules, 1)}


def _import_prompt(model, config, tensors, name):
    p = config["num_virtual_tokens"]
    delta = attach(model, "prompt", length=p, name=name)
    with torch.no_grad():
        delta.controller.layers["encoder__embed"].rows.copy_(tensors["prompt_embeddings"][:p])
    return delta


# ---- prefix-tuning -----------------------------------------------------------------------------------------------


def _peft_prefix_sites(model):
    """PEFT's prefix placement: decoder self-attention for T5 with a decoder, else every self-attention."""
    from deltactl.backbones import backbone_for

    sites = backbone_for(model).sites
    stack = "decoder" if any(n.startswith("decoder.") for n in sites) else "encoder"
    return [s for n, s in sites.items() if s.kind == "memory" and n.startswith(f"{stack}.") and ".attn." in n]


def _slots(layer: int, n_layers: int, seq2seq: bool) -> tuple[int, int]:
    """The (key, value) slots of PEFT's prefix embedding that layer ``layer`` reads (see the module docstring)."""
    if seq2seq:
        return 4 * layer % (2 * n_layers), (4 * layer + 1) % (2 * n_layers)
    return 2 * layer, 2 * layer + 1


def _export_prefix(delta):
    expected = [s.name for s in _peft_prefix_sites(delta.model)]
    actual = [s.name for s in delta.controller.sites]
    if actual != expected:
        raise ValueError(
            f"PEFT's prefix-tuning acts at {expected[0].rsplit('.', 3)[0]}.*.attn.kv only; this prefix acts at "
            f"{', '.join(actual[:3])}…: attach it with sites=({expected[0].split('.')[0]!r}+'.*.attn.kv') to export"
        )
    seq2seq = _task_type(delta) == "SEQ_2_SEQ_LM"
    first = delta.controller.sites[0].dims
    heads, head_dim, n_layers = first["heads"], first["head_dim"], len(actual)
    width, p = heads * head_dim, delta.config.length
    slots = torch.full((p, 2 * n_layers, width), float("nan"), dtype=torch.float64)
    for site in delta.controller.sites:
        with torch.no_grad():
            keys, values = delta.controller.control(site.name, 1)
        for slot, rows in zip(_slots(site.layer, n_layers, seq2seq), (keys, values)):
            rows = rows[0].permute(1, 0, 2).reshape(p, width).double()
            if not torch.isnan(slots[:, slot]).all() and not torch.equal(slots[:, slot], rows):
                raise ValueError(
                    f"PEFT's T5 layout makes decoder layer {site.layer} read the same prefix rows as an earlier "
                    f"layer (slot {slot} of {2 * n_layers}); this prefix has different rows there, so PEFT cannot "
                    "hold it"
                )
            slots[:, slot] = rows
    slots = torch.nan_to_num(slots)  # slots no layer reads (PEFT's T5 layout with L even)
    dtype = next(delta.controller.parameters()).dtype
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": _task_type(delta), "num_virtual_tokens": p, "token_dim": width,
        "num_transformer_submodules": 2 if seq2seq else 1, "prefix_projection": False, "encoder_hidden_size": width,
        **_shape_fields(delta.model), "num_layers": n_layers, "num_attention_heads": heads,
    }
    return config, {"prompt_embeddings": slots.reshape(p, -1).to(dtype)}


def _import_prefix(model, config, tensors, name):
    if config.get("prefix_projection") and "prompt_embeddings" not in tensors:
        raise ValueError("this PEFT prefix saved its projection MLP, not its rows; save it with inference_mode")
    sites = _peft_prefix_sites(model)
    p, n_layers, seq2seq = _peft_prefix_layout(model, config, sites, tensors["prompt_embeddings"])
    heads, head_dim = sites[0].dims["heads"], sites[0].dims["head_dim"]
    slots = tensors["prompt_embeddings"].view(p, 2 * n_layers, heads * head_dim)
    delta = attach(model, "prefix", length=p, reparameterize=False, sites=tuple(s.name for s in sites), name=name)
    with torch.no_grad():
        for site in delta.controller.sites:
            k_slot, v_slot = _slots(site.layer, n_layers, seq2seq)
            rows = delta.controller.rows[site_key(site.name)].view(p, 2, heads * head_dim)
            rows[:, 0], rows[:, 1] = slots[:, k_slot], slots[:, v_slot]
    return delta


def _peft_prefix_layout(model, config, sites, embeddings) -> tuple[int, int, bool]:
    """(num_virtual_tokens, num_layers, seq2seq) of a PEFT prefix, checked against ``model`` and its tensor."""
    stack = sites[0].name.split(".")[0]
    heads, head_dim = sites[0].dims["heads"], sites[0].dims["head_dim"]
    width, depth = heads * head_dim, len(sites)
    # PEFT fills a missing num_layers from the model's num_hidden_layers (T5: the encoder's depth)
    n_layers = config.get("num_layers") or getattr(model.config, "num_hidden_layers", None) or depth
    if n_layers < depth:
        raise ValueError(
            f"this PEFT prefix has num_layers={n_layers}, but the model's {stack} has {depth} self-attention "
            f"layers; PEFT's layout gives layers {n_layers}…{depth - 1} no rows (and PEFT's own forward fails)"
        )
    token_dim, peft_heads = config.get("token_dim") or width, config.get("num_attention_heads") or heads
    if token_dim != width or peft_heads != heads:
        raise ValueError(
            f"this PEFT prefix has token_dim={token_dim} over num_attention_heads={peft_heads}, but the model's "
            f"{stack} self-attention has {width} = {heads} heads × {head_dim}"
        )
    p = config["num_virtual_tokens"]
    if tuple(embeddings.shape) != (p, 2 * n_layers * width):
        raise ValueError(
            f"this PEFT prefix's prompt_embeddings is {tuple(embeddings.shape)}, but num_virtual_tokens={p}, "
            f"num_layers={n_layers} and token_dim={width} make it ({p}, {2 * n_layers * width})"
        )
    submodules = config.get("num_transformer_submodules") or (2 if config.get("task_type") == "SEQ_2_SEQ_LM" else 1)
    return p, n_layers, submodules == 2


# ---- shared ------------------------------------------------------------------------------------------------------


def _shape_fields(model) -> dict:
    cfg = model.config
    heads = getattr(cfg, "num_heads", None) or getattr(cfg, "num_attention_heads", None)
    layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "num_layers", None)
    return {"num_attention_heads": heads, "num_layers": layers or getattr(cfg, "num_hidden_layers", None)}


def _modules_with(tensors, suffix) -> list[str]:
    modules = [k[len(PREFIX) : -len(suffix)] for k in tensors if k.startswith(PREFIX) and k.endswith(suffix)]
    if not modules:
        raise ValueError(f"no tensor named {PREFIX}<module>{suffix} in the adapter")
    return modules


def _names(model, modules) -> list[str]:
    """Canonical site names of linear layers given their module paths."""
    from deltactl.backbones import backbone_for

    by_module = {s.module: n for n, s in backbone_for(model).sites.items() if s.kind == "linear"}
    missing = [m for m in modules if m not in by_module]
    if missing:
        raise ValueError(f"the adapter targets {missing[0]!r}, which is not a linear site of this model")
    return [by_module[m] for m in modules]


def _attach_on_modules(model, method, modules, name, **options):
    config = make_config(method, sites=tuple(_names(model, modules)), **options)
    return attach(model, config, name=name)


_EXPORT = {
    "lora": _export_lora, "dora": _export_lora, "ia3": _export_ia3, "prompt": _export_prompt, "prefix": _export_prefix,
}
_IMPORT = {"LORA": _import_lora, "IA3": _import_ia3, "PROMPT_TUNING": _import_prompt, "PREFIX_TUNING": _import_prefix}
