"""Efficiency of delta tuning against full fine-tuning: peak memory and step time (Ding et al. 2023, §4.1, Fig. 5).

For every (T5 shape, batch size, method) a fresh process (probe.py) builds the random-init model, attaches the
method (or trains everything: ft), and runs AdamW training steps on random tokens; it reports the peak resident
memory the configuration added to the process and the median forward, backward and optimizer times. The saving
is 1 − memory(method) / memory(FT) at the same shape and batch. The paper (T5 on A100 GPUs): delta tuning saves
up to about three quarters of the GPU memory at small batch sizes, the saving shrinking as activations grow with
the batch; backward passes are cheaper, forward passes are not.

    python experiments/efficiency/run.py --quick                  # t5-tiny, batch 1 and 8
    python experiments/efficiency/run.py --setting reduced        # t5-small, batch 1/8/32 (what results/ holds)
    python experiments/efficiency/run.py --shapes t5-base,t5-large --batches 1,8
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments.study import main, save_figure, work_dir  # noqa: E402
from deltactl.shapes import SHAPES  # noqa: E402

LABELS = {"ft": "FT", "prompt": "PT", "prefix": "PF", "lora": "LR", "adapter": "AP", "bitfit": "BF"}
PAPER = "Ding et al. 2023: delta tuning saves up to ~3/4 of GPU memory at small batch sizes (T5 shapes, batch 1-64)"


def configure(p) -> None:
    p.add_argument("--shapes", help=f"comma-separated T5 shapes, replacing the setting's ({', '.join(SHAPES)})")
    p.add_argument("--batches", help="comma-separated batch sizes, replacing the setting's")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: peak memory from the CUDA allocator, reset per "
                   "configuration (each still runs in its own process)")
    p.add_argument("--bf16", action="store_true", help="the loss computation under bfloat16 autocast")


def _list(text: str, cast=str) -> list:
    try:
        return [cast(item) for item in text.split(",") if item]
    except ValueError as err:
        raise ValueError(f"{text!r} is not a comma-separated list of {cast.__name__}s (e.g. 1,8,32)") from err


def probe(shape: str, method: str, batch: int, cfg: dict, cache: Path) -> dict:
    """Run probe.py in a fresh process (its peak memory is this configuration's alone); a measurement with the
    same settings already in ``cache`` is reused, so an interrupted study resumes."""
    options = cfg["method_options"].get(method, {})
    key = {"shape": shape, "method": method, "batch": batch, "options": options, "steps": cfg["steps"],
           "source_length": cfg["source_length"], "target_length": cfg["target_length"], "threads": cfg["threads"]}
    if cfg.get("device", "cpu") != "cpu" or cfg.get("bf16"):  # CPU float32 keys stay as they were: caches still hit
        key.update(device=cfg["device"], bf16=cfg.get("bf16", False))
    stored = cache / (hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if stored.exists():
        return json.loads(stored.read_text())
    argv = [
        sys.executable, str(HERE / "probe.py"), "--shape", shape, "--method", method, "--batch", str(batch),
        "--options", json.dumps(options), "--steps", str(cfg["steps"]),
        "--source-length", str(cfg["source_length"]), "--target-length", str(cfg["target_length"]),
        "--threads", str(cfg["threads"]), "--device", cfg.get("device", "cpu"),
        *(["--bf16"] if cfg.get("bf16") else []),
    ]
    path = os.pathsep.join(filter(None, (str(HERE.parents[1]), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"shape": shape, "method": method, "batch": batch, "error": tail[0]}  # e.g. out of memory
    row = json.loads(done.stdout.strip().splitlines()[-1])
    cache.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(row) + "\n")
    return row


def measure(cfg: dict, args) -> dict:
    cfg = dict(cfg)
    if args.shapes:
        unknown = [s for s in _list(args.shapes) if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
        cfg["shapes"] = _list(args.shapes)
    if args.batches:
        cfg["batches"] = _list(args.batches, int)
    cfg.update(device=args.device, bf16=args.bf16)
    rows = []
    for shape in cfg["shapes"]:
        for batch in cfg["batches"]:
            for method in cfg["methods"]:
                row = probe(shape, method, batch, cfg, work_dir("efficiency", args))
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"settings_used": cfg, "paper": PAPER, "rows": rows, "savings": savings(rows)}


def savings(rows: list[dict]) -> list[dict]:
    """Per shape, batch and method: memory and fwd+bwd time relative to FT in the same run."""
    ok = [r for r in rows if "error" not in r]
    ft = {(r["shape"], r["batch"]): r for r in ok if r["method"] == "ft"}
    out = []
    for r in ok:
        ref = ft.get((r["shape"], r["batch"]))
        if ref is None or r["method"] == "ft":
            continue
        step, ref_step = r["forward_ms"] + r["backward_ms"], ref["forward_ms"] + ref["backward_ms"]
        out.append({
            "shape": r["shape"], "batch": r["batch"], "method": r["method"],
            "memory_saving": 1 - r["peak_mib"] / ref["peak_mib"], "step_time_ratio": step / ref_step,
            "backward_time_ratio": r["backward_ms"] / ref["backward_ms"],
        })
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in payload["rows"] if "error" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(10, 3.6 * len(shapes)), squeeze=False)
    for (ax_mem, ax_time), shape in zip(axes, shapes):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["batch"], r["peak_mib"], r["forward_ms"] + r["backward_ms"])
                         for r in rows if r["shape"] == shape and r["method"] == method)
            label = LABELS.get(method, method)
            ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax_time.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
        gpu = payload["settings_used"].get("device", "cpu") != "cpu"
        memory = "peak CUDA memory allocated (MiB)" if gpu else "peak RSS added (MiB)"
        for ax, what in ((ax_mem, memory), (ax_time, "forward + backward (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(what)
            ax.set_title(f"{shape}, random init, {payload['settings_used'].get('device', 'cpu').upper()}", fontsize=9)
            ax.grid(alpha=0.3)
        ax_mem.legend(fontsize=7)
    save_figure(fig, path, f"efficiency, {payload['mode']} setting (one process per point)")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
