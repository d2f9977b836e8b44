"""The ``deltactl`` command: inspect a model's sites and controllers, count delta parameters."""

from __future__ import annotations

import argparse
import sys

import torch

from deltactl.shapes import SHAPES, t5_config


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return tuple(text.split(",")) if "," in text else text


def method_spec(spec: str):
    """``name[:key=value[:key=value…]]`` → a method config; commas make tuples (``sites=*.q,*.v``)."""
    from deltactl.methods import make_config

    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"method option {pair!r} in {spec!r} is not key=value (e.g. lora:r=16:sites=*.q,*.v)")
        options[key] = (value,) if key == "sites" and "," not in value else _value(value)
    return make_config(name, **options)


def load_model(shape: str | None, path: str | None, device: str = "cpu"):
    """A T5 from a local checkpoint folder, or of a named shape with random weights (nothing downloaded)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    if path:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        return AutoModelForSeq2SeqLM.from_pretrained(
            path, config=config, attn_implementation="eager", local_files_only=True
        ).to(device)
    with torch.device(device):
        return T5ForConditionalGeneration(t5_config(shape))


def cmd_inspect(args):
    import deltactl as dc
    from deltactl.control.tree import tree

    torch.manual_seed(args.seed)
    model = load_model(args.shape, args.model)
    for spec in args.method or []:
        dc.attach(model, method_spec(spec))
    print(tree(model, args.sites, args.attached_only))


def cmd_count(args):
    from deltactl.backbones import backbone_for
    from deltactl.control.accounting import PAPER_PERCENT_T5_BASE, closed_form
    from deltactl.methods import REGISTRY

    model = load_model(args.shape, args.model, device="meta")  # sizes only: no weights are allocated
    backbone = backbone_for(model)
    base = sum(p.numel() for p in model.parameters())
    rows = []
    for spec in args.method or sorted(REGISTRY):
        config = method_spec(spec)
        name = config.method
        n = closed_form(config, backbone)
        paper = PAPER_PERCENT_T5_BASE.get(name) if args.shape == "t5-base" and not args.model else None
        rows.append((name, n, 100.0 * n / base, paper, config))
    print(f"{args.model or args.shape}: {base:,} base parameters")
    print(f"{'method':<10}{'trainable':>14}{'% of base':>11}{'paper %':>9}  config")
    for name, n, pct, paper, config in rows:
        paper_text = f"{paper:.2f}" if paper is not None else "—"
        print(f"{name:<10}{n:>14,}{pct:>11.3f}{paper_text:>9}  {config}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltactl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--shape", default="t5-small", choices=SHAPES, help="named T5 shape, random init")
        p.add_argument("--model", help="local checkpoint folder (overrides --shape)")
        p.add_argument(
            "--method", action="append", metavar="NAME[:KEY=VALUE…]",
            help="delta method with options, e.g. lora:r=16:sites=*.q,*.v (repeatable)",
        )

    p = sub.add_parser("inspect", help="print the model's sites and the controllers acting at each")
    model_args(p)
    p.add_argument("--sites", nargs="*", help="only sites matching these globs")
    p.add_argument("--attached-only", action="store_true", help="only sites where a delta acts")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("count", help="trainable parameters and %% of the model per method")
    model_args(p)
    p.set_defaults(run=cmd_count, shape="t5-base")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"deltactl {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
