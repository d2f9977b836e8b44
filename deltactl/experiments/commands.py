"""``deltactl exp list|run`` (the studies in experiments/) and ``deltactl pretrain-t5`` (small T5 checkpoints)."""

from __future__ import annotations

import json
import shlex


def cmd_list(args) -> None:
    from deltactl.experiments.runner import discover, experiments_root

    studies = discover(args.root)
    print(f"studies in {experiments_root(args.root)}:")
    for name, study in studies.items():
        settings = ", ".join(k for k, v in study.config.items() if isinstance(v, dict))
        committed = "no committed results"
        if study.committed.exists():
            stored = json.loads(study.committed.read_text())
            seconds = stored.get("compute_seconds", stored.get("wall_seconds", "?"))
            committed = f"results/: {stored.get('mode', '?')} setting, {seconds} s"
        text = study.description if len(study.description) <= 96 else study.description[:95] + "…"
        print(f"  {name:<20} {text}")
        print(f"  {'':<20} settings: {settings}; {committed}")


def cmd_run(args) -> None:
    from deltactl.experiments.runner import run_study

    extra = shlex.split(args.study_args or "")
    if args.setting:
        extra = ["--setting", args.setting, *extra]
    code = run_study(args.name, quick=args.quick, out=args.out, data=args.data, plot_only=args.plot_only,
                     extra=extra, root=args.root)
    if code:
        raise SystemExit(code)  # the study's own error is already printed; keep its exit status for CI


def cmd_pretrain(args) -> None:
    from deltactl.train.pretrain import PretrainConfig, default_dir, pretrain

    fields = {k: getattr(args, k) for k in ("size", "steps", "batch_size", "length", "lr", "seed", "log_every",
                                            "max_texts") if getattr(args, k) is not None}
    if args.tasks:
        fields["tasks"] = tuple(args.tasks.split(","))
    config = PretrainConfig(**fields)
    out = args.out or default_dir(config.size)
    record = pretrain(config, out, data=args.data)
    last = record["log"][-1]
    print(f"pre-trained t5-{config.size} ({record['parameters']:,} parameters) for {config.steps} steps in "
          f"{record['seconds']:.0f} s: held-out span-corruption loss {record['log'][0]['held_out_loss']:.3f} → "
          f"{last['held_out_loss']:.3f}; saved to {out}")


def add_commands(sub) -> None:
    from deltactl.train.pretrain import SIZES

    p = sub.add_parser("exp", help="list or run the studies of experiments/")
    exp = p.add_subparsers(dest="exp_command", required=True)
    q = exp.add_parser("list", help="the studies, their settings and their committed results")
    q.add_argument("--root", help="experiments folder (default: the one beside the package, or $DELTACTL_EXPERIMENTS)")
    q.set_defaults(run=cmd_list)
    q = exp.add_parser("run", help="run a study's run.py (quick, a named setting, or full)")
    q.add_argument("name", help="study folder name, e.g. performance (see deltactl exp list)")
    q.add_argument("--quick", action="store_true", help="the small CI setting")
    q.add_argument("--setting", help="a named setting of the study's config.json (e.g. reduced); default full")
    q.add_argument("--out", help="folder for results.json and figure.png")
    q.add_argument("--data", help="data folder (default: $DELTACTL_DATA or ../shared/data)")
    q.add_argument("--plot-only", action="store_true", help="redraw figure.png from results.json")
    q.add_argument("--study-args", help="flags for the study script, e.g. --study-args='--shapes t5-base'")
    q.add_argument("--root", help="experiments folder (default: the one beside the package, or $DELTACTL_EXPERIMENTS)")
    q.set_defaults(run=cmd_run)

    p = sub.add_parser("pretrain-t5", help="pre-train a small T5 (span corruption) on the data folder's text")
    p.add_argument("--size", default="xs", choices=tuple(SIZES), help="model size (default xs)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, help="chunks per step (default 32)")
    p.add_argument("--length", type=int, help="tokens per chunk before corruption (default 64)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--tasks", help="comma-separated tasks whose train texts are the corpus (default: all)")
    p.add_argument("--max-texts", type=int, help="at most this many distinct texts")
    p.add_argument("--out", help="checkpoint folder (default ~/.cache/deltactl/t5-SIZE, or $DELTACTL_CACHE/t5-SIZE)")
    p.add_argument("--data", help="data folder (default: $DELTACTL_DATA or ../shared/data)")
    p.set_defaults(run=cmd_pretrain)
