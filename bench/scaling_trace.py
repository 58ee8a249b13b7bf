"""Record a scaling trace from a real local run: simulated autoscaling pool + Gemini stand-in + the app.

    .venv/bin/python -m bench.scaling_trace [--out bench/results/scaling-trace] [--duration 90]

Starts the Gemini stand-in (127.0.0.1, free port), `serve-app run` with configs/demo-sim-autoscale.yaml,
waits until it serves, runs `serve-app trace --profile step`, then stops both. Writes trace.csv and
trace.png under --out.
"""

from __future__ import annotations

import argparse
import subprocess

from bench.localapp import BIN, ROOT, running_app_with_standin


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench/results/scaling-trace/trace"), help="output prefix (.csv, .png)")
    ap.add_argument("--duration", type=float, default=90)
    ap.add_argument("--peak-concurrency", type=int, default=24)
    args = ap.parse_args()
    with running_app_with_standin(ROOT / "configs/demo-sim-autoscale.yaml") as url:
        cmd = [
            str(BIN / "serve-app"),
            "trace",
            "--url",
            url,
            "--model",
            "sim",
            "--profile",
            "step",
            "--duration",
            str(args.duration),
            "--base-concurrency",
            "2",
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
        return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
