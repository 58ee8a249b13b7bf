"""Record a scaling trace from a real local run: simulated autoscaling pool + Gemini stand-in + the app.

    .venv/bin/python -m bench.scaling_trace [--out bench/results/scaling-trace/trace] [--duration 90]
    .venv/bin/python -m bench.scaling_trace --summarize-only bench/results/scaling-trace/trace.csv

Starts the Gemini stand-in (127.0.0.1, free port), `serve-app run` with --config (default
configs/demo-sim-autoscale.yaml: 4 streams per replica, max 4 replicas, spill on), waits until it
serves, runs `serve-app trace --profile step` (2 -> 24 streams by default), then stops both. Writes
<out>.csv and <out>.png (replicas, spill share, p50/p99 TTFT per second) and <out>-summary.json: the
step response the issue asks for (seconds from the step until the autoscaler's target reaches
max_replicas, against one upscale delay) and the spill share and TTFT before, during and after the step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from bench.localapp import BIN, ROOT, running_app_with_standin
from serve_app.config import load_config


def _num(value: str | None) -> float | None:
    try:
        out = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return None if out is None or math.isnan(out) else out


def _column(row: dict[str, str], prefix: str, suffix: str) -> float | None:
    for key, value in row.items():
        if key.startswith(prefix) and key.endswith(suffix):
            return _num(value)
    return None


def _phase(rows: list[dict[str, str]]) -> dict[str, Any]:
    started = sum(_num(r.get("started")) or 0 for r in rows)
    spilled = sum(_num(r.get("spilled")) or 0 for r in rows)
    hosted = sum(_num(r.get("self_hosted")) or 0 for r in rows)
    p50 = [v for r in rows if (v := _num(r.get("ttft_p50_s"))) is not None]
    p99 = [v for r in rows if (v := _num(r.get("ttft_p99_s"))) is not None]
    return {
        "seconds": len(rows),
        "requests_started": int(started),
        "errors": int(sum(_num(r.get("errors")) or 0 for r in rows)),
        "spill_share": round(spilled / (spilled + hosted), 3) if spilled + hosted else None,
        "ttft_p50_s_median": sorted(p50)[len(p50) // 2] if p50 else None,
        "ttft_p99_s_max": max(p99) if p99 else None,
    }


def summarize(csv_path: Path, max_replicas: int, upscale_delay_s: float) -> dict[str, Any]:
    """The step response from a trace CSV (one row per second, as `serve-app trace` writes it)."""
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    offered = [int(_num(r.get("offered_concurrency")) or 0) for r in rows]
    if not rows or max(offered) == min(offered):
        raise SystemExit(f"{csv_path}: no step in offered_concurrency")
    peak = max(offered)
    step = offered.index(peak)
    end = next((s for s in range(step, len(rows)) if offered[s] < peak), len(rows))
    target = [_column(r, "ray_LLMServer-", "_target") for r in rows]
    running = [_column(r, "ray_LLMServer-", "_running") for r in rows]

    def first_at_max(series: list[float | None]) -> int | None:
        return next((s - step for s in range(step, len(rows)) if (series[s] or 0) >= max_replicas), None)

    to_target = first_at_max(target)
    return {
        "csv": csv_path.name,
        "step_at_s": step,
        "step_to": peak,
        "max_replicas": max_replicas,
        "upscale_delay_s": upscale_delay_s,
        # one upscale delay plus the metrics look-back and a poll second of slack
        "target_at_max_after_s": to_target,
        "running_at_max_after_s": first_at_max(running),
        "target_within_one_upscale_delay": to_target is not None and to_target <= upscale_delay_s + 2,
        "replica_targets_during_step": sorted({int(t) for t in target[step:end] if t is not None}),
        "before_step": _phase(rows[:step]),
        "during_step": _phase(rows[step:end]),
        "after_step": _phase(rows[end:]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench/results/scaling-trace/trace"), help="output prefix (.csv, .png)")
    ap.add_argument("--config", default=str(ROOT / "configs/demo-sim-autoscale.yaml"))
    ap.add_argument("--pool", default="sim", help="the pool (and route) the trace drives")
    ap.add_argument("--duration", type=float, default=90)
    ap.add_argument("--base-concurrency", type=int, default=2)
    ap.add_argument("--peak-concurrency", type=int, default=24)
    ap.add_argument("--summarize-only", metavar="CSV", help="only summarize an existing trace CSV")
    args = ap.parse_args()
    scaling = load_config(args.config).pools[args.pool].deployment.autoscaling
    if scaling is None:
        raise SystemExit(
            f"{args.config}: pools.{args.pool}.deployment.autoscaling: the trace needs an autoscaling pool"
        )
    csv_path = Path(args.summarize_only) if args.summarize_only else Path(args.out + ".csv")
    if not args.summarize_only:
        with running_app_with_standin(Path(args.config)) as url:
            cmd = [
                str(BIN / "serve-app"),
                "trace",
                "--url",
                url,
                "--model",
                args.pool,
                "--profile",
                "step",
                "--duration",
                str(args.duration),
                "--base-concurrency",
                str(args.base_concurrency),
                "--peak-concurrency",
                str(args.peak_concurrency),
                "--max-tokens",
                "50",
                "--dashboard-url",
                "http://127.0.0.1:8265",
                "--out",
                args.out,
            ]
            print("$", " ".join(cmd[1:]), flush=True)
            rc = subprocess.call(cmd)
        if rc != 0:
            return rc
    summary = summarize(csv_path, scaling.max_replicas, scaling.upscale_delay_s)
    out = csv_path.with_name(csv_path.stem + "-summary.json")
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
