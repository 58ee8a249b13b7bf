"""Soak run (issue 11): an hour of mixed traffic with replica kills, recording RSS, fds and the error budget.

    .venv/bin/python -m bench.soak [--duration 3600] [--engine simulated|vllm] [--rate 2.5] [--kill-every 300]

Starts the Gemini stand-in and `serve-app run` (bench/localapp.py) with a config this script writes:

- simulated (default): pool `chat` (2 replicas, 8 sequences each at 30 tok/s, 0.2 s prefill) behind route
  `chat` (self_hosted_only), and pool `burst` (1 replica, 4 sequences) behind route `spill` (spill to the
  stand-in at 4 in flight). Only `chat` replicas are killed, so `burst` is a long-lived LLMServer to watch.
- vllm: the SmolLM2 pool of configs/local-spill.yaml (1 replica) behind both routes.

Traffic (open loop, Poisson at --rate req/s, shared SSE client serve_app.ops.sse_client): streaming and
non-streaming chat and completions, client aborts (the connection is closed after 3 output chunks), spill
requests plus a burst of 12 concurrent spill streams every 45 s, and bad requests (404 unknown model, 400
invalid JSON / missing messages / 5,000-deep nesting / negative max_tokens). Every --kill-every seconds after
the warm-up one `chat` replica is SIGKILLed: the descendant of our own `serve-app run` process that Ray titled
`ray::ServeReplica:serve_app:LLMServer-chat` (see `replica_pids`; never a machine-wide name match).

Every --sample-every seconds: RSS, open fds and threads of every process of the app (all descendants of
`serve-app run`: GCS, raylet, dashboard, Serve controller, proxy, gateway, LLMServer replicas, LoadBoard,
EngineCore) and of this process, and the gateway's GET /admin/pools (open_requests, inflight, replicas,
breakers). Writes bench/results/soak-<engine>-<date>/: processes.csv, traffic.csv, summary.json, soak.png.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench.localapp import ROOT, running_app_with_standin
from bench.soak_procs import app_processes, leftovers, own_app_pid, process_row, replica_pids
from bench.soak_report import GOOD, markdown, summarize
from serve_app.ops.sse_client import StreamRecorder

SIM_CONFIG: dict[str, Any] = {
    "pools": {
        "chat": {
            "engine": "simulated",
            "model": "simulated",
            "simulated": {"max_num_seqs": 8, "tokens_per_second": 30, "first_token_delay_s": 0.2},
            "deployment": {"num_replicas": 2, "num_cpus": 0.1, "max_ongoing_requests": 16, "max_queued_requests": 32},
        },
        "burst": {
            "engine": "simulated",
            "model": "simulated",
            "simulated": {"max_num_seqs": 4, "tokens_per_second": 25, "first_token_delay_s": 0.2},
            "deployment": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 8, "max_queued_requests": 16},
        },
    },
    "routes": {
        "chat": {"policy": "self_hosted_only", "pool": "chat"},
        "spill": {
            "policy": "spill",
            "pool": "burst",
            "gemini_model": "gemini-3.5-flash-lite",
            "saturation": {"max_waiting_per_replica": 1, "max_inflight_per_replica": 4},
        },
    },
    "gemini": {"api_key_env": "GEMINI_API_KEY", "timeout_s": 30},
    "gateway": {"num_cpus": 0.1},
}
KILL_POOL = {"simulated": "chat", "vllm": "smollm2"}
# kind -> weight of the Poisson mix (spill bursts come on top)
MIX = {"chat_stream": 30, "chat": 15, "completion_stream": 10, "completion": 10, "abort": 10, "spill": 15, "bad": 10}
BAD = ("unknown_model", "invalid_json", "no_messages", "deep_nesting", "negative_max_tokens")


def build_config(engine: str) -> dict[str, Any]:
    if engine == "simulated":
        copied: dict[str, Any] = json.loads(json.dumps(SIM_CONFIG))
        return copied
    cfg: dict[str, Any] = yaml.safe_load((ROOT / "configs/local-spill.yaml").read_text())
    spill = cfg["routes"]["smollm2"]
    cfg["routes"] = {"chat": {"policy": "self_hosted_only", "pool": "smollm2"}, "spill": spill}
    return cfg


# ----------------------------------------------------------------------------------------------- traffic
@dataclass
class Outcome:
    t: float
    kind: str
    status: int
    outcome: str  # ok | client_abort | expected_4xx | shed_retry_after | http_5xx | ... (see classify_outcome)
    served_by: str | None = None
    detail: str = ""


def classify_outcome(kind: str, status: int, retry_after: bool, error: str | None, aborted: bool) -> str:
    """One outcome per request, from the client's side."""
    if kind == "bad":
        return "expected_4xx" if status in (400, 404) else f"bad_request_got_{status or 'no_answer'}"
    if status == 0:
        return "transport_error"
    if status in (429, 503):
        return "shed_retry_after" if retry_after else f"http_{status}_no_retry_after"
    if status >= 500:
        return "http_5xx"
    if status != 200:
        return f"http_{status}"
    if aborted:
        return "client_abort"
    if error is None:
        return "ok"
    return "stream_truncated" if error.startswith("stream ended without") else "sse_error"


def request_for(kind: str, rng: random.Random) -> tuple[str, str, dict[str, Any] | bytes, bool]:
    """(path, bad-variant, body, stream) for one request of `kind`."""
    n = rng.randint(16, 64)
    msgs = [{"role": "user", "content": f"Soak request {rng.random():.6f}: tell me something."}]
    if kind == "bad":
        variant = rng.choice(BAD)
        bodies: dict[str, dict[str, Any] | bytes] = {
            "unknown_model": {"model": "no-such-model", "messages": msgs},
            "invalid_json": b'{"model": "chat", "messages": [',
            "no_messages": {"model": "chat"},
            "deep_nesting": b'{"model": "chat", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "negative_max_tokens": {"model": "chat", "messages": msgs, "max_tokens": -5},
        }
        return "/v1/chat/completions", variant, bodies[variant], False
    stream = kind.endswith("_stream") or kind in ("abort", "spill")
    model = "spill" if kind == "spill" else "chat"
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    if kind.startswith("completion"):
        body = {"model": model, "prompt": msgs[0]["content"], "max_tokens": n, "stream": stream, **usage}
        return "/v1/completions", "", body, stream
    return (
        "/v1/chat/completions",
        "",
        {"model": model, "messages": msgs, "max_tokens": n, "stream": stream, **usage},
        stream,
    )


async def one_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random, t0: float) -> Outcome:
    path, variant, body, stream = request_for(kind, rng)
    start = time.monotonic()
    kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
    if isinstance(body, bytes):
        kw["headers"] = {"content-type": "application/json"}
    status, retry_after, error, aborted, served = 0, False, None, False, None
    try:
        if not stream:
            resp = await client.post(url + path, **kw)
            status, served = resp.status_code, resp.headers.get("x-served-by")
            retry_after = "retry-after" in resp.headers
            if status == 200 and not resp.json().get("choices"):
                error = "200 without choices"
            elif status != 200:
                error = resp.text[:200]
        else:
            rec = StreamRecorder(start, record_itl=False)
            async with client.stream("POST", url + path, **kw) as resp:
                status, served = resp.status_code, resp.headers.get("x-served-by")
                retry_after = "retry-after" in resp.headers
                rec.response(status, resp.headers)
                if status != 200:
                    error = (await resp.aread()).decode(errors="replace")[:200]
                else:
                    async for data in resp.aiter_bytes():
                        rec.feed(data, time.monotonic())
                        if rec.stats.done or rec.stats.error:
                            break
                        if kind == "abort" and rec.stats.pieces >= 3:
                            aborted = True  # leaving the block closes the connection mid-stream
                            break
            if status == 200:
                error = rec.finish(time.monotonic()).error if not aborted else None
    except (httpx.HTTPError, ValueError) as err:
        error = f"{type(err).__name__}: {err}"[:200]
    label = f"{kind}:{variant}" if variant else kind
    outcome = classify_outcome(kind, status, retry_after, error, aborted)
    return Outcome(round(start - t0, 2), label, status, outcome, served, error or "")


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0
    skipped: int = 0


async def traffic(url: str, args: argparse.Namespace, tally: Tally, t0: float, stop: asyncio.Event) -> None:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=args.max_in_flight, max_keepalive_connections=32)
    kinds, weights = list(MIX), list(MIX.values())
    tasks: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=10), limits=limits) as client:

        async def run(kind: str) -> None:
            tally.in_flight += 1
            try:
                tally.outcomes.append(await one_request(client, url, kind, rng, t0))
            finally:
                tally.in_flight -= 1

        def launch(kind: str) -> None:
            if tally.in_flight >= args.max_in_flight:
                tally.skipped += 1
                return
            task = asyncio.create_task(run(kind))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        next_burst = time.monotonic() + args.burst_every
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=rng.expovariate(args.rate))
            except TimeoutError:
                pass
            if stop.is_set():
                break
            launch(rng.choices(kinds, weights)[0])
            if time.monotonic() >= next_burst:
                next_burst += args.burst_every
                for _ in range(args.burst_size):
                    launch("spill")
        if tasks:
            await asyncio.wait(tasks, timeout=args.request_timeout + 10)


# ------------------------------------------------------------------------------------- processes and kills
async def killer(app_pid: int, pool: str, args: argparse.Namespace, t0: float, kills: list[dict[str, Any]]) -> None:
    await asyncio.sleep(args.warmup)
    while True:
        record: dict[str, Any] = {"t": round(time.monotonic() - t0, 1)}
        try:
            victims = before = await asyncio.to_thread(replica_pids, app_pid, pool)
            if not victims:
                record["error"] = f"no replica of pool {pool} found"
            else:
                victim = victims[len(kills) % len(victims)]
                os.kill(victim, signal.SIGKILL)
                record.update(pid=victim, replicas_before=len(before))
                for _ in range(120):  # until Serve has as many replicas alive again
                    await asyncio.sleep(1)
                    after = await asyncio.to_thread(replica_pids, app_pid, pool)
                    if len(after) >= len(before) and victim not in after:
                        record["replaced_after_s"] = round(time.monotonic() - t0 - record["t"], 1)
                        record["new_pid"] = sorted(set(after) - set(before))
                        break
        except Exception as err:  # the soak keeps going; the summary shows the failed kill
            record["error"] = f"{type(err).__name__}: {err}"[:300]
        kills.append(record)
        print(f"[soak] kill {len(kills)}: {record}", flush=True)
        await asyncio.sleep(max(1.0, args.kill_every - (time.monotonic() - t0 - record["t"])))


PROC_FIELDS = ["t", "pid", "role", "rss_mb", "fds", "threads", "cpu_s"]
TRAFFIC_FIELDS = ["t", "requests", "client_in_flight", "open_requests", "gateway_inflight", "errors", "http_5xx"]


def traffic_fields(pools: list[str]) -> list[str]:
    return TRAFFIC_FIELDS + [f"{p}_{k}" for p in pools for k in ("replicas", "breaker", "saturated")]


async def sampler(
    app_pid: int, url: str, pools: list[str], tally: Tally, t0: float, out: Path, every: float, stop: asyncio.Event
) -> set[tuple[int, float]]:
    """Sample until `stop`; returns (pid, create_time) of every app process seen (for the leftover check)."""
    me, seen = psutil.Process(), set()
    with (out / "processes.csv").open("w", newline="") as pf, (out / "traffic.csv").open("w", newline="") as tf:
        pw, tw = csv.DictWriter(pf, PROC_FIELDS), csv.DictWriter(tf, traffic_fields(pools))
        pw.writeheader()
        tw.writeheader()
        async with httpx.AsyncClient(timeout=5) as client:
            while not stop.is_set():
                t = round(time.monotonic() - t0, 1)
                for proc in [*app_processes(app_pid), me]:
                    if (row := process_row(proc, t)) is not None:
                        pw.writerow(row)
                        if proc is not me:
                            seen.add((proc.pid, proc.create_time()))
                outcomes = list(tally.outcomes)
                trow: dict[str, Any] = {
                    "t": t,
                    "requests": len(outcomes),
                    "client_in_flight": tally.in_flight,
                    "errors": sum(1 for o in outcomes if o.outcome not in GOOD),
                    "http_5xx": sum(1 for o in outcomes if o.status >= 500),
                }
                try:
                    admin = (await client.get(f"{url}/admin/pools")).json()
                    trow["open_requests"] = admin.get("open_requests")
                    trow["gateway_inflight"] = sum((admin.get("inflight") or {}).values())
                    for name, pool in admin.get("pools", {}).items():
                        trow.update({f"{name}_{k}": pool.get(k) for k in ("replicas", "breaker", "saturated")})
                except (httpx.HTTPError, ValueError) as err:
                    trow["open_requests"] = f"admin error: {type(err).__name__}"
                tw.writerow({k: v for k, v in trow.items() if k in tw.fieldnames})
                pf.flush()
                tf.flush()
                try:
                    await asyncio.wait_for(stop.wait(), timeout=every)
                except TimeoutError:
                    pass
    return seen


async def soak(url: str, args: argparse.Namespace, out: Path, pools: list[str]) -> dict[str, Any]:
    app_pid, t0 = own_app_pid(url), time.monotonic()
    tally, stop = Tally(), asyncio.Event()
    kills: list[dict[str, Any]] = []
    load = asyncio.create_task(traffic(url, args, tally, t0, stop))
    sample = asyncio.create_task(sampler(app_pid, url, pools, tally, t0, out, args.sample_every, stop))
    kill = asyncio.create_task(killer(app_pid, KILL_POOL[args.engine], args, t0, kills)) if args.kill_every else None
    try:
        await asyncio.wait_for(asyncio.shield(load), timeout=args.duration)
    except TimeoutError:
        pass
    finally:
        if kill is not None:
            kill.cancel()
        stop.set()
        await load
        seen = await sample
    return {"tally": tally, "kills": kills, "seen": seen, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3600, help="seconds of traffic")
    ap.add_argument("--engine", choices=("simulated", "vllm"), default="simulated")
    ap.add_argument("--rate", type=float, default=2.5, help="Poisson arrivals per second (plus spill bursts)")
    ap.add_argument("--burst-every", type=float, default=45, help="seconds between spill bursts")
    ap.add_argument("--burst-size", type=int, default=12, help="concurrent spill streams per burst")
    ap.add_argument("--kill-every", type=float, default=300, help="seconds between replica kills (0: none)")
    ap.add_argument("--warmup", type=float, default=300, help="seconds before the first kill and RSS baseline")
    ap.add_argument("--sample-every", type=float, default=10)
    ap.add_argument("--max-in-flight", type=int, default=64, help="client-side cap (arrivals beyond are skipped)")
    ap.add_argument("--request-timeout", type=float, default=120)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", help="result folder (default bench/results/soak-<engine>-<UTC date-time>)")
    args = ap.parse_args()
    if args.engine == "vllm":
        engines = sum(1 for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("VLLM"))
        if engines >= 2:
            raise SystemExit(f"{engines} VLLM:: engines already run on this machine; try later")
    started = datetime.now(UTC)
    out = Path(args.out) if args.out else ROOT / f"bench/results/soak-{args.engine}-{started:%Y%m%d-%H%M}"
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(args.engine)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with running_app_with_standin(out / "config.yaml") as url:
        print(f"[soak] app ready at {url}; {args.duration:.0f} s of traffic -> {out}", flush=True)
        run = asyncio.run(soak(url, args, out, list(config["pools"])))
    time.sleep(5)
    left = leftovers(run["seen"])
    outcomes = [o.__dict__ | {"detail": "" if o.outcome in GOOD else o.detail} for o in run["tally"].outcomes]
    with (out / "requests.jsonl").open("w") as f:
        f.writelines(json.dumps(o) + "\n" for o in outcomes)
    meta = {
        "engine": args.engine,
        "command": "python -m bench.soak "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": run["seconds"],
        "warmup_s": args.warmup,
        "client_skipped_at_cap": run["tally"].skipped,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "leftover_processes": left,
    }
    summary = summarize(out, meta, outcomes, run["kills"])
    print(json.dumps({k: summary[k] for k in ("duration_s", "targets", "leftover_processes")}, indent=2))
    print(json.dumps(summary["error_budget"], indent=2))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
