"""``deltactl theory …``: check the statements of theory/, compare controllability, compare MSA with Adam."""

from __future__ import annotations

import sys


def cmd_check(args) -> None:
    from deltactl.theory.statements import STATEMENTS, run, table

    if args.list:
        for s in STATEMENTS.values():
            print(f"{s.name:<24}{s.claim}  [{s.model}; theory/{s.name}.md]")
        return
    results = run(args.only)
    print(table(results, details=not args.brief))
    failed = [r.statement.name for r in results if not r.passed]
    if failed:
        print(f"\n{len(failed)} of {len(results)} statements failed: {', '.join(failed)}")
        sys.exit(1)
    print(f"\nall {len(results)} statements hold")


def cmd_reach(args) -> None:
    from deltactl.theory.compare import controllability_at_equal_budget

    rows = controllability_at_equal_budget(args.out)
    print(f"{'method':<10}{'params':>8}{'rank':>6}{'of':>6}  top singular values")
    for r in rows:
        top = " ".join(f"{v:.2g}" for v in r["values"][:5])
        print(f"{r['method']:<10}{r['params']:>8}{r['rank']:>6}{r['outputs']:>6}  {top}")


def cmd_msa(args) -> None:
    from deltactl.theory.compare import msa_vs_adam

    summary = msa_vs_adam(args.out, quick=args.quick, data=args.data, plot_only=args.plot_only)
    for name, run in summary["runs"].items():
        print(f"{name:<6} final train loss {run['train_loss'][-1]:.4f}  dev accuracy {run['accuracy'][-1]:.4f}  "
              f"{run['seconds']:.0f} s")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("theory", help="check the theory statements; controllability; MSA against Adam")
    sub = p.add_subparsers(dest="theory_command", required=True)

    c = sub.add_parser("check", help="run the numerical checks of theory/*.md (exit code 1 if any fails)")
    c.add_argument("--only", nargs="+", metavar="NAME", help="only these statements (see --list)")
    c.add_argument("--list", action="store_true", help="list the statements and exit")
    c.add_argument("--brief", action="store_true", help="the table only, without what each check measured")
    c.set_defaults(run=cmd_check)

    r = sub.add_parser("reach", help="rank and spectrum of ∂logits/∂δ per method at ≈ 192 parameters (tiny T5)")
    r.add_argument("--out", help="folder for reach.json and reach.png")
    r.set_defaults(run=cmd_reach)

    m = sub.add_parser("msa", help="train LoRA on SST-2 (MiniLM) with MSA and with Adam; curves + figure")
    m.add_argument("--out", default="runs/theory-msa", help="folder for msa_vs_adam.json and .png")
    m.add_argument("--quick", action="store_true", help="a short run: 128 sentences, 4 steps per optimiser")
    m.add_argument("--data", help="data folder (default: $DELTACTL_DATA or ../shared/data)")
    m.add_argument("--plot-only", action="store_true", help="redraw the figure from the JSON in --out")
    m.set_defaults(run=cmd_msa)
