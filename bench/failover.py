"""Failover benchmark (issue 12): many long streams while a replica is SIGKILLed every --kill-every seconds.

    .venv/bin/python -m bench.failover [--engine simulated|vllm] [--streams 200] [--concurrency 16]
                                       [--kill-every 20] [--replicas 3] [--min-tokens 200] [--max-tokens 400]

This process is the Ray driver (ray.init + serve.start on a free 127.0.0.1 port, like the integration tests):
that is what lets it ask `serve.get_deployment_handle("LLMServer-<pool>", app_name=...).stats.remote()` for
a replica's pid without reading any cluster token. The victim must also be a descendant of this process
(checked with psutil) before it is SIGKILLed; nothing is looked up or killed by name.

- simulated (default): one pool of --replicas replicas (max_num_seqs 8, 20 tok/s per sequence, 0.2 s
  prefill) behind a `self_hosted_only` route; gateway defaults (max_continuations 2, pool_retries 1).
  The answer is the engine's fixed word sequence, so each completed stream's text must equal the first
  max_tokens words of it ("no duplicated, no missing text" checked exactly).
- vllm: SmolLM2 (configs/local.yaml's pool) in float32, greedy; every stream has the same prompt and
  max_tokens, and its text is compared with one reference stream sent before the first kill.

Per stream (streams.csv): HTTP status, [DONE], SSE error, the `: serve_app failover ...` comments, TTFT,
the stall at each switch (last output chunk before the comment → first output chunk after it), the
largest inter-chunk gap, text check, and the gateway's request-log line (`failovers`, `outcome`).
summary.json holds the command, gateway config, the kills, the load average during the run and the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import random
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.failover_client import StreamResult, one_stream
from bench.failover_report import chart, gateway_log_lines, rows, summarize
from bench.localapp import ROOT, free_port
from serve_app.testing.gemini_standin import running_standin

APP = "failover"
POOL = "fo"
ROUTE = "fo"
GEMINI_KEY_ENV = "SERVE_APP_FAILOVER_GEMINI_KEY"
GEMINI_KEY = "failover-bench-key"
VLLM_PROMPT = "Write a long story about a lighthouse keeper and a storm at sea."


def build_config(args: argparse.Namespace, gemini_url: str) -> dict[str, Any]:
    route: dict[str, Any] = {"policy": args.policy, "pool": POOL}
    if args.policy == "spill":
        route["gemini_model"] = "gemini-3.5-flash-lite"
    gemini = {"api_key_env": GEMINI_KEY_ENV, "base_url": gemini_url, "timeout_s": 30}
    deployment = {
        "num_replicas": args.replicas,
        "max_ongoing_requests": args.max_ongoing,
        "max_queued_requests": 64,
    }
    if args.engine == "simulated":
        pool: dict[str, Any] = {
            "engine": "simulated",
            "model": "simulated",
            "simulated": {"max_num_seqs": 8, "tokens_per_second": args.tok_s, "first_token_delay_s": 0.2},
            "deployment": {**deployment, "num_cpus": 0.1},
        }
    else:
        from serve_app.config import load_config  # expands ${SERVE_APP_CACHE:-...} in the model path

        pool = load_config(str(ROOT / "configs/local.yaml")).pools["smollm2"].model_dump(mode="json")
        pool["vllm"].update(dtype="float32", cpu_kv_cache_space_gib=1, max_model_len=2048)
        pool["deployment"] = {**deployment, "num_cpus": 1}
    return {"pools": {POOL: pool}, "routes": {ROUTE: route}, "gemini": gemini, "gateway": {"num_cpus": 0.1}}


# ----------------------------------------------------------------------------------------------- chaos
def my_descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


async def replica_stats(want: int, within_s: float) -> dict[str, dict[str, Any]]:
    """stats() of up to `want` distinct replicas of the pool, asked through the deployment handle."""
    from ray import serve

    handle = serve.get_deployment_handle(f"LLMServer-{POOL}", app_name=APP)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + within_s
    while len(seen) < want and time.monotonic() < deadline:
        try:
            st = await asyncio.to_thread(lambda: handle.stats.remote().result(timeout_s=10))
            seen[st["replica_id"]] = st
        except Exception:  # a replica that just died; ask again
            await asyncio.sleep(0.3)
    return seen


async def killer(args: argparse.Namespace, t0: float, kills: list[dict[str, Any]], stop: asyncio.Event) -> None:
    rng = random.Random(args.seed)
    while not stop.is_set() and (args.max_kills <= 0 or len(kills) < args.max_kills):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=args.kill_every)
            return
        record: dict[str, Any] = {"t": round(time.monotonic() - t0, 2)}
        seen = await replica_stats(args.replicas, within_s=5)
        live = sorted(seen.values(), key=lambda st: st["replica_id"])
        record["replicas_answering"] = len(live)
        if not live:
            record["error"] = "no replica answered stats()"
        else:
            victim = rng.choice(live)
            pid = int(victim["pid"])
            record.update(pid=pid, replica_id=victim["replica_id"], active=victim.get("active"))
            if pid not in my_descendants():
                record["error"] = "pid is not a descendant of this process: not killed"
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                record["killed_at"] = round(time.monotonic() - t0, 2)
        print(f"[failover] kill {len(kills) + 1}: {record}", flush=True)
        kills.append(record)


async def sampler(
    client: httpx.AsyncClient, base: str, t0: float, out: dict[str, list[Any]], stop: asyncio.Event
) -> None:
    """Every second: the pool as the gateway sees it (/admin/pools); every 5 s the 1-minute load average."""
    keys = ("replicas", "ready_replicas", "waiting", "running", "inflight")
    tick = 0
    while not stop.is_set():
        t = round(time.monotonic() - t0, 1)
        if tick % 5 == 0:
            out["load"].append((t, os.getloadavg()[0]))
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            pool = (await client.get(f"{base}/admin/pools", timeout=5)).json()["pools"][POOL]
            out["pool"].append({"t": t, **{k: pool.get(k) for k in keys}})
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1)


async def run_load(args: argparse.Namespace, base: str, run_id: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    url = f"{base}/v1/chat/completions"
    timeout = httpx.Timeout(600, connect=30)
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        ref_text = None
        if args.engine == "vllm":  # one reference answer before any kill (same prompt, greedy)
            ref = await one_stream(
                client, url, 9999, run_id + "-ref", args.max_tokens, VLLM_PROMPT, time.monotonic(), ROUTE
            )
            ref_text = ref.text if ref.stats.ok else None
        t0 = time.monotonic()
        stop = asyncio.Event()
        kills: list[dict[str, Any]] = []
        samples: dict[str, list[Any]] = {"load": [], "pool": []}
        tasks = [
            asyncio.create_task(killer(args, t0, kills, stop)),
            asyncio.create_task(sampler(client, base, t0, samples, stop)),
        ]
        sem = asyncio.Semaphore(args.concurrency)

        async def bounded(i: int) -> StreamResult:
            if args.engine == "vllm":
                n, prompt = args.max_tokens, VLLM_PROMPT
            else:
                n, prompt = rng.randint(args.min_tokens, args.max_tokens), f"Failover stream {i}: go on."
            async with sem:
                return await one_stream(client, url, i, run_id, n, prompt, t0, ROUTE)

        results = await asyncio.gather(*(bounded(i) for i in range(args.streams)))
        duration = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*tasks)
    return {
        "results": results,
        "kills": kills,
        "load": samples["load"],
        "pool": samples["pool"],
        "duration_s": duration,
        "reference": ref_text,
    }


# ----------------------------------------------------------------------------------------------- main
@contextlib.contextmanager
def local_cluster() -> Iterator[str]:
    """Ray + Serve in this process on free ports; yields the session dir. Stops Serve and Ray on exit."""
    import ray
    from ray import serve

    from serve_app import ray_env

    ray_env.apply()
    os.environ[GEMINI_KEY_ENV] = GEMINI_KEY
    ray.init(num_cpus=8, include_dashboard=False, _metrics_export_port=free_port(), log_to_driver=False)
    try:
        session = ray._private.worker._global_node.get_session_dir_path()  # type: ignore[attr-defined]
        yield str(session)
    finally:
        engines = [p for p in psutil.Process().children(recursive=True) if _is_vllm(p)]
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        left = [p for p in engines if p.is_running()]
        if left:
            psutil.wait_procs(left, timeout=30)
            for p in left:
                if p.is_running():
                    print(f"[failover] engine process {p.pid} left behind: SIGKILL", flush=True)
                    with contextlib.suppress(psutil.Error):
                        p.kill()


def _is_vllm(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.name().startswith("VLLM::")
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("simulated", "vllm"), default="simulated")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kill-every", type=float, default=20.0)
    ap.add_argument("--max-kills", type=int, default=0, help="stop killing after this many (0: no limit)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--max-ongoing", type=int, default=32, help="Serve max_ongoing_requests per LLMServer replica")
    ap.add_argument("--min-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--tok-s", type=float, default=20.0, help="simulated tokens/s per sequence")
    ap.add_argument("--policy", choices=("self_hosted_only", "spill"), default="self_hosted_only")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M")
    out = args.out or ROOT / "bench" / "results" / f"failover-{args.engine}-{stamp}"
    run_id = f"fo{int(time.time())}"
    load_before = os.getloadavg()
    from ray import serve

    from serve_app.app import build_app
    from serve_app.config import GatewayConfig

    with running_standin(api_key=GEMINI_KEY, latency_ms=300, tokens_per_second=100) as standin:
        config = build_config(args, standin.base_url)
        with local_cluster() as session:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(config), name=APP, route_prefix="/")
            seen = asyncio.run(replica_stats(args.replicas, within_s=300))
            print(f"[failover] {len(seen)} replicas ready; session {session}", flush=True)
            run = asyncio.run(run_load(args, f"http://127.0.0.1:{port}", run_id))
            time.sleep(3)  # let the gateway write its last log lines
            logs = gateway_log_lines(session, run_id)
    gw = GatewayConfig()  # the run sets none of these: the defaults apply
    table = rows(run["results"], logs, args.engine, run["reference"], run["kills"], run["pool"])
    summary = summarize(table, run["kills"])
    loads = [v for _, v in run["load"]]
    summary.update(
        command=" ".join(["python -m bench.failover", *(argv if argv is not None else sys.argv[1:])]),
        engine=args.engine,
        config=config,
        gateway_defaults={k: getattr(gw, k) for k in ("max_continuations", "pool_retries", "stream_idle_timeout_s")},
        args={k: str(v) for k, v in vars(args).items()},
        duration_s=round(run["duration_s"], 1),
        load_average_1m={
            "before": round(load_before[0], 2),
            "min": min(loads, default=None),
            "median": statistics.median(loads) if loads else None,
            "max": max(loads, default=None),
            "cpus": os.cpu_count(),
        },
        kill_log=run["kills"],
        gateway_log_lines=len(logs),
        reference_text_chars=len(run["reference"]) if run["reference"] else None,
    )
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "pool.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["t", "replicas", "ready_replicas", "waiting", "running", "inflight"])
        writer.writeheader()
        writer.writerows(run["pool"])
    with open(out / "streams.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with contextlib.suppress(Exception):
        chart(table, run["kills"], out / "failover.png")
    brief = {
        k: summary[k] for k in ("completed_share", "continued_streams", "kills", "stall_s", "ttft_s", "text_mismatch")
    }
    print(json.dumps(brief, indent=2), f"\nwritten to {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
