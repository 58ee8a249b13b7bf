"""Record the issue-15 scaling traces from real local runs: simulated pool + Gemini stand-in + the app.

    .venv/bin/python -m bench.scaling_trace --scenario step|zero|slo [--warmup S] [--summarize-only CSV]

Starts the Gemini stand-in and `serve-app run` (each its own process session, stopped with SIGINT to its
group), drives a phase script of streaming chat requests (serve_app.ops.trace's Tracer; /admin/pools and
the dashboard of *this* app's Ray cluster polled every second) and writes <out>.csv / .png (per second),
<out>-requests.csv (per request, its phase) and <out>-summary.json (verdict, load average, decisions).
  step: 2 -> 24 -> 2 streams, demo-sim-autoscale.yaml: seconds until the target reaches max_replicas.
  zero: demo-sim-zero.yaml (min_replicas 0): idle until the pool is at 0, then a burst: errors, Gemini
        share, seconds until a replica runs (cold start).
  slo:  demo-sim-slo.yaml (ttft_slo_ms, 1 replica of 4 sequences): 3 streams (75 %), 40 (10 x), 3 again:
        per-phase spill share and p50/p99 TTFT against the SLO.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.localapp import BIN, ROOT, free_port
from serve_app.config import load_config
from serve_app.ops.trace import TraceOptions, Tracer
from serve_app.ops.trace_report import RequestRecord, percentile, write_chart, write_csv

KEY = "demo-key"
STANDIN = {"step": (300, 100), "zero": (300, 100), "slo": (50, 400)}  # latency ms, tokens/s (headroom)
CONFIGS = {"step": "demo-sim-autoscale.yaml", "zero": "demo-sim-zero.yaml", "slo": "demo-sim-slo.yaml"}
OUTS = {"step": "scaling-trace/trace", "zero": "scale-from-zero/trace", "slo": "slo-spill/trace"}


@dataclass(frozen=True)
class Phase:
    name: str
    concurrency: int
    seconds: float  # how long (or, with `until`, the most it waits)
    until: Callable[[Tracer], bool] | None = None  # end early once this holds (checked every 0.1 s)


def pool_at_zero(tr: Tracer) -> bool:
    """The last poll saw the pool's deployment with target 0 and no RUNNING replica."""
    last = tr.samples.get(max(tr.samples)) if tr.samples else None
    deps = last.deployments if last is not None else None
    return bool(deps) and all(t == 0 and r == 0 for t, r in (deps or {}).values())


def script(scenario: str, base: int, peak: int, warmup: float = 0) -> list[Phase]:
    """The phases; a warm-up (1 stream, not counted in any verdict) runs first when `warmup` > 0."""
    first = [Phase("warmup", 1, warmup)] if warmup > 0 else []
    return first + _script(scenario, base, peak)


def _script(scenario: str, base: int, peak: int) -> list[Phase]:
    if scenario == "step":
        return [Phase("before", base, 20), Phase("step", peak, 45), Phase("after", base, 25)]
    if scenario == "zero":
        idle = Phase("idle", 0, 150, pool_at_zero)
        return [Phase("warm", 2, 10), idle, Phase("at_zero", 0, 3), Phase("burst", peak, 45)]
    return [Phase("steady", base, 60), Phase("burst", peak, 30), Phase("steady_after", base, 20)]


class ScriptedTracer(Tracer):
    """The Tracer with a phase script instead of a fixed profile; remembers each request's phase."""

    def __init__(self, opts: TraceOptions, client: httpx.AsyncClient, phases: list[Phase]) -> None:
        super().__init__(opts, client, asyncio.get_running_loop().time)
        self.phases = phases
        self.offered = []
        self.phase_of: dict[int, str] = {}
        self.phase_starts: dict[str, float] = {}
        self.loads: list[float] = []

    async def _drive(self) -> None:
        for ph in self.phases:
            start = self.now()
            self.phase_starts[ph.name] = round(start, 2)
            while (t := self.now()) - start < ph.seconds and not (ph.until and ph.until(self)):
                while len(self.offered) <= int(t):
                    self.offered.append(ph.concurrency)
                    self.loads.append(os.getloadavg()[0])
                while len(self.in_flight) < ph.concurrency and len(self.records) < self.opts.max_requests:
                    self._start_request()
                    self.phase_of[id(self.records[-1])] = ph.name
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.1)
        self.phase_starts["end"] = round(self.now(), 2)


# --- the app and the stand-in, each in its own process session --------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C for the session we started, nothing else
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def running(config: Path, scenario: str, log: Path) -> Iterator[tuple[str, str, Path | None]]:
    """(app URL, dashboard URL of the app's own Ray cluster, its session dir) while both processes run."""
    latency, tps = STANDIN[scenario]
    sport, port, mport = free_port(), free_port(), free_port()
    env = {**os.environ, "GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": f"http://127.0.0.1:{sport}"}
    standin_cmd = [sys.executable, "-m", "serve_app.testing.gemini_standin", "--port", str(sport)]
    standin_cmd += ["--latency-ms", str(latency), "--tokens-per-second", str(tps)]
    standin = subprocess.Popen(standin_cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    app_cmd = [str(BIN / "serve-app"), "run", "--config", str(config), "--port", str(port)]
    with log.open("wb") as out:
        app = subprocess.Popen(
            [*app_cmd, "--metrics-port", str(mport)], env=env, start_new_session=True, stdout=out, stderr=out
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if app.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve-app run did not get ready (see {log})")
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                pools = httpx.get(f"{url}/admin/pools", timeout=2).json()["pools"]
                if pools and all(p["ready_replicas"] >= 1 for p in pools.values()):
                    break
            time.sleep(1)
        text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
        found = re.search(r"View the dashboard at (\S+)", text)
        dashboard = found.group(1) if found else "127.0.0.1:8265"
        yield url, dashboard if dashboard.startswith("http") else "http://" + dashboard, session_dir(app.pid)
    finally:
        _stop(app)
        _stop(standin)


def session_dir(pid: int) -> Path | None:
    """The Ray session dir of the cluster our app process started (from its gcs_server's arguments)."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(pid).children(recursive=True):
            for arg in child.cmdline():
                if arg.startswith("--session-dir="):
                    return Path(arg.split("=", 1)[1])
    return None


def decisions(session: Path | None) -> list[dict[str, Any]]:
    """The controller's JSON scale-decision lines (serve_app.autoscaling.decision_log_line)."""
    out: list[dict[str, Any]] = []
    for path in sorted((session / "logs" / "serve").glob("controller_*.log")) if session else []:
        for line in path.read_text(errors="replace").splitlines():
            if '"serve_app.autoscaling.decision"' in line:
                with contextlib.suppress(ValueError):
                    d = json.loads(line[line.index("{") :])
                    when = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line)
                    out.append({"log_time": when and when.group(0)} | {k: d[k] for k in ("from", "to", "reason")})
    return out


def _log_time(line: str) -> float | None:
    found = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line)
    return (
        time.mktime(time.strptime(found.group(0)[:19], "%Y-%m-%d %H:%M:%S")) + int(found.group(0)[20:]) / 1000
        if found
        else None
    )


def request_lines(session: Path | None) -> list[dict[str, Any]]:
    """The gateway's request log lines (one JSON object per request, `_end`: its wall time)."""
    out: list[dict[str, Any]] = []
    for path in sorted((session / "logs" / "serve").glob("replica_*Gateway*.log")) if session else []:
        for line in path.read_text(errors="replace").splitlines():
            end = _log_time(line)
            if '"request_id"' in line and '"route"' in line and end is not None:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    d = json.loads(line[line.index("{") :])
                    out.append(d | {"_end": end, "duration_ms": float(d["duration_ms"])})
    return out


def slowest_pool_requests(session: Path | None, n: int = 8) -> list[dict[str, Any]]:
    """The self-hosted requests with the longest TTFT and what the SLO gate predicted for them."""
    pool = [d for d in request_lines(session) if d["route"] == "self_hosted" and d.get("ttft_ms") is not None]
    keep = ("predicted_ttft_ms", "correction", "base_ms", "inflight", "waiting", "pending_prompt_tokens")
    return [
        {"ttft_ms": d["ttft_ms"]} | {k: (d.get("spill_inputs") or {}).get(k) for k in keep}
        for d in sorted(pool, key=lambda d: -float(d["ttft_ms"]))[:n]
    ]


def with_gateway_view(session: Path | None, scale: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each decision plus what the gateway really had in flight then (pool / Gemini), rebuilt from the
    request log lines (end time - duration_ms): the ground truth the autoscaler's inputs lag behind."""
    spans = [(d["_end"] - d["duration_ms"] / 1000, d["_end"], d["route"]) for d in request_lines(session)]
    for dec in scale:
        t = _log_time(dec.get("log_time") or "")
        if t is not None and spans:  # mean over the 1.5 s before the decision, sampled every 0.1 s
            ts = [t - k / 10 for k in range(15)]
            dec["gateway_inflight_mean_1_5s_before"] = {
                route: round(sum(1 for x in ts for a, b, r in spans if r == route and a <= x < b) / len(ts), 1)
                for route in ("self_hosted", "gemini")
            }
    return scale


# --- summaries ---------------------------------------------------------------------------------------------


def write_requests(tr: ScriptedTracer, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["phase", "start_s", "ttft_s", "end_s", "served_by", "error", "cancelled"])
        for r in tr.records:
            ttft = None if r.ttft is None else round(r.ttft, 4)
            end = None if r.end is None else round(r.end, 3)
            w.writerow([tr.phase_of.get(id(r), ""), round(r.start, 3), ttft, end, r.served_by, r.error, r.cancelled])


def read_requests(path: Path) -> list[tuple[str, RequestRecord]]:
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            start = float(row["start_s"])
            rec = RequestRecord(start=start, served_by=row["served_by"] or None, error=row["error"] or None)
            rec.first_token = start + float(row["ttft_s"]) if row["ttft_s"] else None
            rec.end = float(row["end_s"]) if row["end_s"] else None
            rec.cancelled = row["cancelled"] == "True"
            out.append((row["phase"], rec))
    return out


def phase_stats(recs: list[RequestRecord]) -> dict[str, Any]:
    done = [r for r in recs if not r.cancelled]
    ttfts = [r.ttft for r in done if r.ttft is not None and r.error is None]
    served = [r for r in done if r.served_by is not None]
    spilled = sum(r.served_by == "gemini" for r in served)

    def p(q: float) -> float | None:
        v = percentile(ttfts, q)
        return None if v is None else round(v, 3)

    return {
        "requests": len(done),
        "errors": sum(r.error is not None for r in done),
        "spilled": spilled,
        "spill_share": round(spilled / len(served), 3) if served else None,
        "ttft_p50_s": p(50),
        "ttft_p99_s": p(99),
        "ttft_max_s": round(max(ttfts), 3) if ttfts else None,
    }


def _rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return list(csv.DictReader(f))


def _col(row: dict[str, str], suffix: str) -> float | None:
    for key, value in row.items():
        if key.startswith("ray_LLMServer-") and key.endswith(suffix) and value not in (None, ""):
            return float(value)
    return None


def _first(rows: list[dict[str, str]], frm: int, suffix: str, at_least: float) -> int | None:
    return next((s for s in range(frm, len(rows)) if (_col(rows[s], suffix) or 0) >= at_least), None)


def summarize(scenario: str, csv_path: Path, config: Path, pool: str) -> dict[str, Any]:
    cfg = load_config(config)
    scaling = cfg.pools[pool].deployment.autoscaling
    rows = _rows(csv_path)
    reqs = read_requests(csv_path.with_name(csv_path.stem + "-requests.csv"))
    phases: dict[str, list[RequestRecord]] = {}
    for name, rec in reqs:
        phases.setdefault(name, []).append(rec)
    out: dict[str, Any] = {"scenario": scenario, "csv": csv_path.name, "config": str(config.relative_to(ROOT))}
    out["phases"] = {name: phase_stats(recs) for name, recs in phases.items()}
    offered = [int(float(r["offered_concurrency"] or 0)) for r in rows]
    if scenario == "step" and scaling is not None:
        step = offered.index(max(offered))
        to_target = _first(rows, step, "_target", scaling.max_replicas)
        to_running = _first(rows, step, "_running", scaling.max_replicas)
        out |= {
            "step_at_s": step,
            "max_replicas": scaling.max_replicas,
            "upscale_delay_s": scaling.upscale_delay_s,
            "target_at_max_after_s": None if to_target is None else to_target - step,
            "running_at_max_after_s": None if to_running is None else to_running - step,
            # one upscale delay, plus the metrics interval and a poll second of slack
            "pass_target_within_one_upscale_delay": to_target is not None
            and to_target - step <= scaling.upscale_delay_s + scaling.metrics_interval_s + 1,
        }
    if scenario == "zero" and scaling is not None:
        burst = offered.index(max(offered))
        zero = next((s for s in range(len(rows)) if _col(rows[s], "_target") == 0 == _col(rows[s], "_running")), None)
        t_target, t_running = _first(rows, burst, "_target", 1), _first(rows, burst, "_running", 1)
        hosted = sorted(r.start for r in phases.get("burst", []) if r.served_by == "self-hosted")
        b = phases.get("burst", [])
        out |= {
            "pool_at_zero_at_s": zero,
            "burst_at_s": burst,
            "wake_to_target_1_s": None if t_target is None else t_target - burst,
            "replica_running_after_s": None if t_running is None else t_running - burst,
            "replica_start_s": None if t_target is None or t_running is None else t_running - t_target,
            "first_self_hosted_request_after_s": round(hosted[0] - burst, 2) if hosted else None,
            # the requests that arrived while the pool had no running replica: Gemini's, at once
            "burst_before_replica": phase_stats([r for r in b if t_running is None or r.start < t_running]),
            "pass": zero is not None
            and zero < burst
            and bool(b)
            and all(r.error is None for r in b if not r.cancelled)
            and t_running is not None,
        }
    if scenario == "slo":
        slo_s = min(r.ttft_slo_ms for r in cfg.effective_routes().values() if r.ttft_slo_ms) / 1000
        burst, steady = out["phases"].get("burst", {}), out["phases"].get("steady", {})
        out |= {
            "ttft_slo_s": slo_s,
            "burst_p99_over_slo": None if burst.get("ttft_p99_s") is None else round(burst["ttft_p99_s"] / slo_s, 3),
            "pass_burst": burst.get("errors") == 0 and (burst.get("ttft_p99_s") or 1e9) <= 1.2 * slo_s,
            "pass_steady": steady.get("errors") == 0 and (steady.get("spill_share") or 0) < 0.05,
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=("step", "zero", "slo"), default="step")
    ap.add_argument("--out", help="output prefix (default bench/results/<scenario dir>/trace)")
    ap.add_argument("--config", help="default configs/demo-sim-{autoscale,zero,slo}.yaml")
    ap.add_argument("--pool", default="sim", help="the pool (and route) the trace drives")
    ap.add_argument("--base-concurrency", type=int, help="step: 2, slo: 3 (75 %% of 4 sequences)")
    ap.add_argument("--peak-concurrency", type=int, help="step: 24, zero: 8, slo: 40 (10 x 4 sequences)")
    ap.add_argument("--max-tokens", type=int, default=30)
    ap.add_argument("--warmup", type=float, default=0, help="seconds of 1 stream first (not in any verdict)")
    ap.add_argument("--summarize-only", metavar="CSV", help="only summarize an existing trace CSV")
    args = ap.parse_args()
    sc = args.scenario
    config = Path(args.config or ROOT / "configs" / CONFIGS[sc]).resolve()
    out = Path(args.out or ROOT / "bench/results" / OUTS[sc])
    csv_path = Path(args.summarize_only) if args.summarize_only else out.with_suffix(".csv")
    extra: dict[str, Any] = {}
    if not args.summarize_only:
        base = args.base_concurrency if args.base_concurrency is not None else {"step": 2, "slo": 3}.get(sc, 0)
        peak = args.peak_concurrency or {"step": 24, "zero": 8, "slo": 40}[sc]
        out.parent.mkdir(parents=True, exist_ok=True)
        extra = asyncio.run(_record(sc, config, args.pool, script(sc, base, peak, args.warmup), args.max_tokens, out))
    summary = summarize(sc, csv_path, config, args.pool)
    if not extra:
        old = csv_path.with_name(csv_path.stem + "-summary.json")
        if old.exists():  # keep what only the live run knew (load, decisions)
            extra = {k: v for k, v in json.loads(old.read_text()).items() if k not in summary}
    summary |= extra
    path = csv_path.with_name(csv_path.stem + "-summary.json")
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


async def _record(sc: str, config: Path, pool: str, phases: list[Phase], max_tokens: int, out: Path) -> dict[str, Any]:
    log = Path(f"/tmp/scaling-trace-{sc}-{os.getpid()}.log")
    load_before = os.getloadavg()
    with running(config, sc, log) as (url, dashboard, session):
        print(f"app {url}, dashboard {dashboard}, session {session}", flush=True)
        opts = TraceOptions(url=url, model=pool, max_tokens=max_tokens, dashboard_url=dashboard)
        peak = max(p.concurrency for p in phases)
        timeout = httpx.Timeout(120.0, connect=10.0)
        limits = httpx.Limits(max_connections=peak + 4, max_keepalive_connections=peak + 4)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            tr = ScriptedTracer(opts, client, phases)
            rows = await tr.run()
        scale = with_gateway_view(session, decisions(session))
        slowest = slowest_pool_requests(session) if sc == "slo" else None
    write_csv(rows, out.with_suffix(".csv"))
    write_chart(rows, out.with_suffix(".png"), title=f"{sc}: " + " -> ".join(f"{p.concurrency}" for p in phases))
    write_requests(tr, out.with_name(out.name + "-requests.csv"))
    loads = tr.loads or [0.0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "phase_starts_s": tr.phase_starts,
        "load_average_1m": {
            "before": round(load_before[0], 1),
            "during_min": round(min(loads), 1),
            "during_mean": round(sum(loads) / len(loads), 1),
            "during_max": round(max(loads), 1),
        },
        "cpus": os.cpu_count(),
        "scale_decisions": scale,
        **({"slowest_self_hosted_requests": slowest} if slowest is not None else {}),
        "ray_session": None if session is None else session.name,
    }


if __name__ == "__main__":
    raise SystemExit(main())
