"""What every study script shares: its flags, its mode's settings, results.json with provenance, the figure.

A study's ``run.py`` defines ``measure(settings, args) -> dict`` and ``plot(payload, path)`` and calls
:func:`main`; ``--plot-only`` redraws ``figure.png`` from ``results.json`` without measuring anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deltactl.control.io import write_atomic
from deltactl.tasks.data import cache_root


def parser(description: str) -> argparse.ArgumentParser:
    """The standard flags of experiments/README.md: --quick, --out, --data, --plot-only."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="the small CI setting (config.json 'quick')")
    p.add_argument("--setting", help="another named block of config.json (e.g. 'reduced'); default 'full'")
    p.add_argument("--out", help="folder for results.json and figure.png (default results/ or results-quick/)")
    p.add_argument("--data", help="data folder (default: $DELTACTL_DATA or ../shared/data)")
    p.add_argument("--plot-only", action="store_true", help="redraw figure.png from an existing results.json")
    return p


def mode(args) -> str:
    """``quick`` (--quick), the block named by --setting, or ``full``."""
    if args.quick and args.setting not in (None, "quick"):
        raise ValueError(f"--quick and --setting {args.setting} contradict each other; give one")
    return "quick" if args.quick else args.setting or "full"


def settings(folder: Path, name: str) -> dict:
    """The block ``name`` (quick, full, or another named setting) of ``folder/config.json``."""
    config = json.loads((Path(folder) / "config.json").read_text())
    blocks = [k for k, v in config.items() if isinstance(v, dict)]
    if name not in blocks:
        raise ValueError(f"{Path(folder) / 'config.json'} has no setting {name!r}; settings: {', '.join(blocks)}")
    return config[name]


def out_dir(folder: Path, args) -> Path:
    """--out, else ``results-quick/`` (not committed) in quick mode, else ``results/``."""
    return Path(args.out) if args.out else Path(folder) / ("results-quick" if mode(args) == "quick" else "results")


def environment() -> dict:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu_cores_allowed": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
    }


def load_results(out: Path) -> dict:
    path = Path(out) / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the study without --plot-only first")
    return json.loads(path.read_text())


def save_results(out: Path, payload: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    # atomically: a kill mid-write leaves the old results (which --keep-runs may be reading) or the new, never half
    return write_atomic(path, json.dumps(payload, indent=1, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in results.json")


def main(
    folder: Path, measure: Callable[[dict, argparse.Namespace], dict], plot: Callable[[dict, Path], None],
    argv=None, configure: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Parse the flags, measure (unless --plot-only), write results.json, draw figure.png; returns 0.

    Bad input (an unknown setting, no results.json to redraw, a bad flag value) prints one line and returns 2.
    """
    try:
        return _main(Path(folder), measure, plot, argv, configure)
    except (ValueError, FileNotFoundError) as err:
        print(f"{Path(folder).name}/run.py: {err}", file=sys.stderr)
        return 2


def _main(folder: Path, measure, plot, argv, configure) -> int:
    config = json.loads((folder / "config.json").read_text())
    p = parser(config["description"])
    if configure:
        configure(p)
    args = p.parse_args(argv)
    out = out_dir(folder, args)
    if args.plot_only:
        payload = load_results(out)
    else:
        chosen = settings(folder, mode(args))
        started = time.perf_counter()
        results = measure(chosen, args)
        payload = {
            "study": folder.name, "mode": mode(args), "config": chosen,
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "wall_seconds": round(time.perf_counter() - started, 1), "environment": environment(),
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **results,
        }
        save_results(out, payload)
    import matplotlib

    matplotlib.use("Agg")
    plot(payload, out / "figure.png")
    print(f"{folder.name}: {out / 'results.json'} and {out / 'figure.png'}")
    return 0


def begin(folder: Path, args, plot: Callable[[dict, Path], None]) -> tuple[str, Path, dict] | None:
    """For scripts that write results.json themselves: (mode, output folder, created, and the mode's settings);
    None once ``--plot-only`` has redrawn figure.png from the stored results."""
    out = out_dir(folder, args)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(load_results(out), out / "figure.png")
        return None
    return mode(args), out, settings(folder, mode(args))


def work_dir(study: str, args) -> Path:
    """Where a study keeps its run folders (resumable; reused by later studies such as the generalisation gap)."""
    return cache_root() / "experiments" / study / mode(args)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var**0.5


def threads() -> int:
    """``$DELTACTL_THREADS`` torch threads if set (1 suits a shared machine), else every core allowed."""
    n = int(os.environ.get("DELTACTL_THREADS") or len(os.sched_getaffinity(0)))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def save_figure(fig, path, title: str | None = None) -> None:
    """A study's figure to ``path``: the title above every panel, a tight layout, PNG at 120 dpi, then closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish_bars(ax, names: list[str], ylabel: str, title: str, rotation: int = 0) -> None:
    """The common frame of a bar panel of accuracies: the bars' names, the 0.4–1.0 range, labels, legend, grid."""
    ax.set_xticks(range(len(names)), names, rotation=rotation, fontsize=8 if rotation else None)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


VERDICT_COLOURS = {"agrees": "tab:green", "disagrees": "tab:red", "inconclusive": "tab:gray"}


def plot_verdicts(ax, verdicts: list[dict], xlabel: str, labels: list[str] | None = None) -> None:
    """A panel of claims: each verdict's difference as a point with its interval, coloured by the verdict, with a
    match rule's ±margin marked and 0 drawn."""
    ys = list(range(len(verdicts)))[::-1]
    for y, v in zip(ys, verdicts):
        d = v["difference"]
        ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                    color=VERDICT_COLOURS[v["verdict"]], capsize=4)
        if v["rule"]["kind"] == "match":
            for edge in (-v["rule"]["margin"], v["rule"]["margin"]):
                ax.plot([edge, edge], [y - 0.3, y + 0.3], color="k", lw=0.6)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(ys, labels or [f"{v['id']} {v['claim']}: {v['verdict']}" for v in verdicts], fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
