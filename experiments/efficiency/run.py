"""Efficiency of delta tuning against full fine-tuning: peak memory and step time (Ding et al. 2023, §4.1, Fig. 5),
on the study protocol.

For every (T5 shape, batch size, method, repeat) a fresh process (probe.py) builds the random-init model,
attaches the method (or trains everything: ft), resets the peak (CPU: the resident high-water mark; GPU:
``torch.cuda.reset_peak_memory_stats``) and runs AdamW training steps on random tokens; it reports the peak memory
the training added to the process since before the model was built and the median forward, backward and
optimizer times. Repeats run repeat-major (repeat 0 of every configuration, then repeat 1, …), so a difference
between methods pairs repeat i with repeat i. Every table cell is the mean over repeats with a bootstrap 95%
interval; the claims E1–E3 and their rules are stated in README.md (``CLAIMS`` below).

    python experiments/efficiency/run.py --quick                  # t5-tiny, batch 1 and 4, 2 repeats
    python experiments/efficiency/run.py                          # full: t5-small 1/4/16, t5-base 1/8, 3 repeats
    python experiments/efficiency/run.py --shapes t5-base,t5-large --batches 1,8
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # a checkout without installing: import the deltactl beside experiments/

from deltactl.experiments import protocol as pr  # noqa: E402
from deltactl.experiments.study import main, save_figure, work_dir  # noqa: E402
from deltactl.shapes import SHAPES  # noqa: E402

LABELS = {"ft": "FT", "prompt": "PT", "prefix": "PF", "lora": "LR", "adapter": "AP", "bitfit": "BF",
          "last_layer": "LL", "selective": "SM"}
PAPER = ("Ding et al. 2023 (Fig. 5, T5 shapes on A100 GPUs, batch 1-64): delta tuning saves up to ~3/4 of the peak "
         "GPU memory at small batch sizes, the saving shrinking as the batch grows; the backward pass is cheaper "
         "than full fine-tuning's, the forward pass is not")
WHY = ("a measurement of the machine: peak memory and step time of training steps of random-init T5 shapes on "
       "random token ids; nothing is chosen on data, so there is no split to keep apart. The repeats (a fresh "
       "process per shape, batch, method and repeat) are the seeds.")
QUANTITIES = ("peak_mib", "forward_ms", "backward_ms", "step_ms", "optimizer_ms")
# The claims and rules of README.md, stated before the full run: (id, claim, what the per-repeat value is).
# Each is scored per shape and per delta method (every method but ft); "smallest"/"largest" are the shape's batches.
CLAIMS = (
    ("E1", "the delta method uses less peak memory than FT at the smallest batch",
     "peak_mib(FT) − peak_mib(method) at the smallest batch, paired per repeat (MiB)"),
    ("E2", "the delta method's relative memory saving shrinks as the batch grows",
     "saving(smallest batch) − saving(largest batch), saving = 1 − peak_mib(method) / peak_mib(FT), per repeat"),
    ("E3", "the delta method's backward pass is cheaper than FT's",
     "backward_ms(FT) − backward_ms(method) at the largest batch, paired per repeat (ms)"),
)


def configure(p) -> None:
    p.add_argument("--shapes", help=f"comma-separated T5 shapes, replacing the setting's ({', '.join(SHAPES)})")
    p.add_argument("--batches", help="comma-separated batch sizes for every shape, replacing the setting's")
    p.add_argument("--repeats", type=int, help="repeats per configuration (a fresh process each), replacing the "
                   "setting's")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: peak memory from the CUDA allocator, reset per "
                   "configuration (each still runs in its own process)")
    p.add_argument("--bf16", action="store_true", help="the loss computation under bfloat16 autocast")


def _list(text: str, cast=str) -> list:
    try:
        return [cast(item) for item in text.split(",") if item]
    except ValueError as err:
        raise ValueError(f"{text!r} is not a comma-separated list of {cast.__name__}s (e.g. 1,8,32)") from err


def batches_for(cfg: dict, shape: str) -> list[int]:
    """The batch sizes of ``shape``: the setting's ``batches`` is one list for every shape or a list per shape."""
    batches = cfg["batches"]
    return sorted(batches[shape] if isinstance(batches, dict) else batches)


def probe(shape: str, method: str, batch: int, cfg: dict, cache: Path, repeat: int = 0) -> dict:
    """Run probe.py in a fresh process (its peak memory is this configuration's alone); a measurement with the
    same settings and repeat index already in ``cache`` is reused, so an interrupted study resumes."""
    options = cfg["method_options"].get(method, {})
    key = {"shape": shape, "method": method, "batch": batch, "options": options, "steps": cfg["steps"],
           "source_length": cfg["source_length"], "target_length": cfg["target_length"], "threads": cfg["threads"],
           "repeat": repeat, "peak": "reset after build", "device": cfg.get("device", "cpu"),
           "bf16": cfg.get("bf16", False)}
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
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"shape": shape, "method": method, "batch": batch, "repeat": repeat, "error": tail[0]}  # e.g. OOM
    row = {**json.loads(done.stdout.strip().splitlines()[-1]), "repeat": repeat,
           "process_seconds": round(time.perf_counter() - started, 2),
           "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
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
    if args.repeats:
        cfg["repeats"] = args.repeats
    cfg.update(device=args.device, bf16=args.bf16)
    if "ft" not in cfg["methods"]:
        raise ValueError("the methods must include ft: every saving and claim is relative to full fine-tuning")
    rows = []
    for repeat in range(cfg.get("repeats", 1)):  # repeat-major: drift of the machine touches every method alike
        for shape in cfg["shapes"]:
            for batch in batches_for(cfg, shape):
                for method in cfg["methods"]:
                    row = probe(shape, method, batch, cfg, work_dir("efficiency", args), repeat)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return {"settings_used": cfg, "paper": PAPER, "protocol": {"data": pr.NO_DATA, "why": WHY}, "rows": rows,
            "table": table(rows, cfg), "verdicts": verdicts(rows, cfg, unread := []), "unread": unread,
            "savings": savings(rows)}


def _values(rows: list[dict], shape: str, batch: int, method: str, quantity: str) -> dict[int, float]:
    """Per repeat index: the quantity of one configuration (repeats that failed are absent)."""
    out = {}
    for r in rows:
        if "error" in r or (r["shape"], r["batch"], r["method"]) != (shape, batch, method):
            continue
        out[r.get("repeat", 0)] = r["forward_ms"] + r["backward_ms"] if quantity == "step_ms" else r[quantity]
    return out


def _saving(rows: list[dict], shape: str, batch: int, method: str) -> dict[int, float]:
    """Per repeat: 1 − peak(method) / peak(FT), both of that repeat."""
    mine, ft = _values(rows, shape, batch, method, "peak_mib"), _values(rows, shape, batch, "ft", "peak_mib")
    return {i: 1 - mine[i] / ft[i] for i in sorted(mine.keys() & ft.keys()) if ft[i] > 0}


def table(rows: list[dict], cfg: dict) -> list[dict]:
    """One row per (shape, batch, method, quantity): mean over repeats with its bootstrap 95% interval."""
    out = []
    for shape in cfg["shapes"]:
        for batch in batches_for(cfg, shape):
            for method in cfg["methods"]:
                cells = {q: _values(rows, shape, batch, method, q) for q in QUANTITIES}
                if method != "ft":
                    cells["memory_saving"] = _saving(rows, shape, batch, method)
                for quantity, values in cells.items():
                    if values:
                        out.append({"method": method, "shape": shape, "batch": batch, "quantity": quantity,
                                    "repeats": sorted(values),
                                    "summary": pr.summary([values[i] for i in sorted(values)]).to_dict()})
    return out


def _paired(a: dict[int, float], b: dict[int, float]) -> pr.Summary | None:
    """a − b, repeat i against repeat i (the repeats both have)."""
    shared = sorted(a.keys() & b.keys())
    return pr.paired_summary([a[i] for i in shared], [b[i] for i in shared]) if shared else None


def verdicts(rows: list[dict], cfg: dict, unread: list | None = None) -> list[dict]:
    """E1–E3 of README.md, per shape and delta method, each by ``BetterRule`` on its paired difference. A claim
    with nothing to pair (every repeat of one side failed, e.g. out of memory) gets no verdict; it is appended to
    ``unread`` with the reason, so that results.json says which claims went unread rather than dropping them."""
    rule, out = pr.BetterRule(), []
    for shape in cfg["shapes"]:
        batches = batches_for(cfg, shape)
        small, large = batches[0], batches[-1]
        for claim_id, claim, quantity in CLAIMS:
            if claim_id == "E2" and small == large:
                continue  # one batch size: nothing to shrink across
            for method in [m for m in cfg["methods"] if m != "ft"]:
                if claim_id == "E1":
                    difference = _paired(_values(rows, shape, small, "ft", "peak_mib"),
                                         _values(rows, shape, small, method, "peak_mib"))
                    where = {"batch": small}
                elif claim_id == "E2":
                    difference = _paired(_saving(rows, shape, small, method), _saving(rows, shape, large, method))
                    where = {"batches": [small, large]}
                else:
                    difference = _paired(_values(rows, shape, large, "ft", "backward_ms"),
                                         _values(rows, shape, large, method, "backward_ms"))
                    where = {"batch": large}
                claim_text = f"{shape}, {LABELS.get(method, method)}: {claim}"
                if difference is None:
                    if unread is not None:
                        unread.append({"id": claim_id, "claim": claim_text, "why": "no repeat measured both sides "
                                       "(every repeat of one side failed; see the rows' errors)"})
                    continue
                out.append({"id": claim_id, "claim": claim_text,
                            "shape": shape, "method": method, **where, "quantity": quantity,
                            "rule": pr.rule_record(rule), "difference": difference.to_dict(),
                            "verdict": rule.verdict(difference)})
    return out


def savings(rows: list[dict]) -> list[dict]:
    """Per shape, batch, method and repeat: memory and fwd+bwd time relative to FT of the same repeat."""
    ok = [r for r in rows if "error" not in r]
    ft = {(r["shape"], r["batch"], r.get("repeat", 0)): r for r in ok if r["method"] == "ft"}
    out = []
    for r in ok:
        ref = ft.get((r["shape"], r["batch"], r.get("repeat", 0)))
        if ref is None or r["method"] == "ft":
            continue
        step, ref_step = r["forward_ms"] + r["backward_ms"], ref["forward_ms"] + ref["backward_ms"]
        out.append({
            "shape": r["shape"], "batch": r["batch"], "method": r["method"], "repeat": r.get("repeat", 0),
            "memory_saving": 1 - r["peak_mib"] / ref["peak_mib"], "step_time_ratio": step / ref_step,
            "backward_time_ratio": r["backward_ms"] / ref["backward_ms"],
        })
    return out


def plot(payload: dict, path: Path) -> None:
    """Per shape: peak memory, memory saving vs FT, forward and backward time against the batch size, each point
    the mean over repeats with its bootstrap 95% interval as the error bar."""
    import matplotlib.pyplot as plt

    rows = payload["table"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    gpu = payload["settings_used"].get("device", "cpu") != "cpu"
    panels = (("peak_mib", "peak CUDA memory allocated (MiB)" if gpu else "peak resident memory added (MiB)"),
              ("memory_saving", "memory saving vs FT (1 − peak / peak FT)"),
              ("forward_ms", "forward (ms)"), ("backward_ms", "backward (ms)"))
    fig, axes = plt.subplots(len(shapes), len(panels), figsize=(4.2 * len(panels), 3.6 * len(shapes)),
                             squeeze=False)
    for line, shape in zip(axes, shapes):
        for ax, (quantity, what) in zip(line, panels):
            for k, method in enumerate(methods):
                cells = sorted((r["batch"], r["summary"]) for r in rows
                               if (r["shape"], r["method"], r["quantity"]) == (shape, method, quantity))
                if not cells:
                    continue
                shift = 1.04 ** (k - (len(methods) - 1) / 2)  # side by side on the log axis
                mean = [c["mean"] for _, c in cells]
                err = [[c["mean"] - c["low"] for _, c in cells], [c["high"] - c["mean"] for _, c in cells]]
                ax.errorbar([b * shift for b, _ in cells], mean, yerr=err, marker="o", ms=3, capsize=3, lw=1,
                            color=f"C{k}", label=LABELS.get(method, method))
            ax.set_xscale("log", base=2)
            if quantity != "memory_saving":
                ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(what, fontsize=8)
            device = payload["settings_used"].get("device", "cpu").upper()
            ax.set_title(f"{shape}, random init, {device}", fontsize=9)
            ax.grid(alpha=0.3)
        line[0].legend(fontsize=7)
    n = payload["settings_used"].get("repeats", 1)
    save_figure(fig, path, f"efficiency, {payload['mode']} setting: mean and bootstrap 95% interval over {n} repeats "
                           "(a fresh process each)")


if __name__ == "__main__":
    sys.exit(main(HERE, measure, plot, configure=configure))
