"""Streaming ceiling: how many streamed tokens/s the request path carries when the engine is never the limit.

The simulated engine runs at unrealistic rates so only the path counts: client → Ray Serve proxy →
Gateway → LLMServer replica → back, versus a bare FastAPI/uvicorn SSE server that emits the same stream
from the same simulated engine (the practical limit). Three kinds of cells:

- bulk: a few streams from an engine at 100k tok/s (many tokens per chunk: the replica's `coalesce`
  merges whatever is waiting into one item per Ray hop);
- per-token: many streams at 100 tok/s each (one token per chunk: the per-chunk hop cost);
- probe: one stream at 100 tok/s, time to first token and inter-token gaps (added latency per chunk).

CPU seconds of the gateway, proxy and replica processes are read with psutil; tokens/s per gateway core
is delivered tokens/s divided by the gateway's busy cores.

    python -m bench.streaming_ceiling [--duration 12] [--quick] [--fast-paths throughput-optimized,grpc]
        [--batch-interval-ms 5] [--profile 8]

serve_app runs as configured, then once per Ray fast path (`--fast-paths`, env vars of the local Ray
cluster, see bench/systems.py RAY_FAST_PATHS) and once with the pool's `stream_batch_interval_ms` > 0.
Before each system the harness waits for a quiet machine (no VLLM:: process, load below --max-load) and
records the load. `--profile SECONDS` runs py-spy on the gateway and the LLMServer replica during the
plain serve_app's fewest-streams per-token cell and writes text summaries to bench/results/profile-*/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]  # no stubs installed

from bench import profile as spy
from bench.charts import grouped_bars
from bench.common import (
    PYTHON,
    RESULTS,
    Server,
    command_line,
    free_port,
    http_ok,
    machine,
    machine_md,
    md_table,
    median,
    percentile,
    setup_logging,
    wait_quiet,
    write_json,
)
from bench.loadgen import Result, chat_body, closed_loop, new_session, stream_chat
from bench.systems import RAY_FAST_PATHS, app_config, fast_path_env, start_app, write_config

logger = logging.getLogger("bench.streaming")


def sim(tokens_per_second: float, max_model_len: int) -> dict[str, Any]:
    return {
        "engine": "simulated",
        "model": "sim",
        "simulated": {
            "max_num_seqs": 4096,
            "tokens_per_second": tokens_per_second,
            "first_token_delay_s": 0.0,
            "max_model_len": max_model_len,
        },
        "deployment": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 4096, "max_queued_requests": -1},
    }


POOLS = {"fast": sim(100_000.0, 16384), "paced": sim(100.0, 4096)}  # paced = PER_STREAM_TOKENS_PER_S


def process_groups(root: int) -> dict[str, list[psutil.Process]]:
    """The server's processes by role (only descendants of the server we started)."""
    groups: dict[str, list[psutil.Process]] = {"gateway": [], "proxy": [], "replica": [], "server": []}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return groups
    for p in procs:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "Gateway" in cmd:
            groups["gateway"].append(p)
        elif "ProxyActor" in cmd:
            groups["proxy"].append(p)
        elif "LLMServer" in cmd:
            groups["replica"].append(p)
        elif p.pid == root:
            groups["server"].append(p)
    return groups


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for role, procs in groups.items():
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[role] = total
    return out


async def run_cell(url: str, model: str, streams: int, max_tokens: int, duration: float) -> list[Result]:
    return await closed_loop(url, chat_body(model, max_tokens), streams, duration, timeout_s=120)


async def probe(url: str, requests: int) -> list[Result]:
    out = []
    async with new_session() as session:
        for _ in range(requests):
            out.append(await stream_chat(session, url, chat_body("paced", 100), 60, gaps=True))
    return out


def measure(
    system: str,
    url: str,
    root: int,
    cells: list[tuple[str, str, int, int]],
    duration: float,
    profile_dir: Path | None = None,
) -> list[dict[str, Any]]:
    groups = process_groups(root)
    me = psutil.Process()
    rows = []
    asyncio.run(run_cell(url, "paced", 4, 50, 2.0))  # warm-up: connections, handles, code paths
    per_token = [c for c in cells if c[0] == "per-token"]
    profiled = min(per_token, key=lambda c: c[2]) if profile_dir is not None and per_token else None
    for cell in cells:
        kind, model, streams, max_tokens = cell
        spies = spy.start_profiles(groups, duration, profile_dir) if cell == profiled and profile_dir else {}
        load = [round(x, 2) for x in os.getloadavg()]
        before, client_before, t0 = cpu_seconds(groups), me.cpu_times(), time.monotonic()
        results = asyncio.run(run_cell(url, model, streams, max_tokens, duration))
        wall = time.monotonic() - t0
        if spies and profile_dir is not None:
            chunks = sum(r.pieces for r in results if r.ok)
            spy.write_profiles(spies, profile_dir, system, cell, chunks, wall)
        after, client_after = cpu_seconds(groups), me.cpu_times()
        cores = {k: (after[k] - before[k]) / wall for k in after}
        cores["client"] = (client_after.user + client_after.system - client_before.user - client_before.system) / wall
        tokens = sum(r.tokens for r in results if r.ok)
        tps = tokens / wall
        gw = cores["gateway"] if is_app(system) else cores["server"]
        row = {
            "system": system,
            "kind": kind,
            "streams": streams,
            "max_tokens": max_tokens,
            "wall_s": round(wall, 2),
            "requests": len(results),
            "failed": sum(not r.ok for r in results),
            "tokens_per_s": tps,
            "ttft_p50_ms": _ms(median([r.ttft_s for r in results if r.ttft_s is not None])),
            "cores": {k: round(v, 3) for k, v in cores.items()},
            "tokens_per_s_per_gateway_core": tps / gw if gw > 0 else None,
            "load_before_cell": load,
        }
        logger.info("%s %s streams=%d: %.0f tok/s, cores %s", system, kind, streams, tps, row["cores"])
        rows.append(row)
    res = asyncio.run(probe(url, 5))
    gaps = [g for r in res for g in r.itl_s]
    rows.append(
        {
            "system": system,
            "kind": "probe",
            "streams": 1,
            "max_tokens": 100,
            "requests": len(res),
            "failed": sum(not r.ok for r in res),
            "ttft_p50_ms": _ms(median([r.ttft_s for r in res if r.ttft_s is not None])),
            "gap_p50_ms": _ms(percentile(gaps, 50)),
            "gap_p99_ms": _ms(percentile(gaps, 99)),
            "gap_mean_ms": _ms(sum(gaps) / len(gaps) if gaps else None),
        }
    )
    return rows


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1000


def start_baseline(log: Path) -> tuple[Server, str]:
    port = free_port()
    srv = Server(
        "sse-baseline",
        [PYTHON, "-m", "bench.sse_baseline", "--port", str(port), "--pools-json", json.dumps(POOLS)],
        log,
    )
    srv.start()
    base = f"http://127.0.0.1:{port}"
    srv.wait_ready(lambda: http_ok(base + "/health"), 60)
    return srv, base


PER_STREAM_TOKENS_PER_S = 100.0


def offered(row: dict[str, Any]) -> float | None:
    return row["streams"] * PER_STREAM_TOKENS_PER_S if row["kind"] == "per-token" else None


def _per_core(row: dict[str, Any]) -> float:
    return float(row["tokens_per_s_per_gateway_core"] or 0.0)


def _verdict(system: str, what: str, row: dict[str, Any]) -> str:
    per_core = _per_core(row)
    off = offered(row)
    kept = "" if off is None else f", {100 * row['tokens_per_s'] / off:.0f}% of the offered {off:,.0f}"
    return (
        f"- {system}, {what}: {per_core:,.0f} tok/s per gateway core ({row['streams']} streams, "
        f"{row['tokens_per_s']:,.0f} tok/s delivered{kept}): {'met' if per_core >= 5000 else 'NOT met'}"
    )


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = [
        "system",
        "cell",
        "streams",
        "offered tok/s",
        "delivered tok/s",
        "gateway (or server) cores",
        "proxy cores",
        "replica cores",
        "client cores",
        "tok/s per gateway core",
        "TTFT p50 ms",
        "failed",
    ]
    body = []
    for r in rows:
        if r["kind"] == "probe":
            continue
        c = r["cores"]
        gw = c["gateway"] if is_app(r["system"]) else c["server"]
        body.append(
            [
                r["system"],
                r["kind"],
                r["streams"],
                offered(r),
                r["tokens_per_s"],
                gw,
                c.get("proxy"),
                c.get("replica"),
                c["client"],
                r["tokens_per_s_per_gateway_core"],
                r["ttft_p50_ms"],
                r["failed"],
            ]
        )
    probes = [
        [r["system"], r["ttft_p50_ms"], r["gap_p50_ms"], r["gap_p99_ms"], r["gap_mean_ms"]]
        for r in rows
        if r["kind"] == "probe"
    ]
    verdicts = []
    for system in dict.fromkeys(r["system"] for r in rows if is_app(r["system"])):
        mine = [r for r in rows if r["system"] == system and r["kind"] == "per-token"]
        if mine:
            # The fewest streams is the cell closest to one token per Ray hop; with more streams the
            # engine falls behind and tokens share chunks (and the replica's coalesce merges them).
            first = min(mine, key=lambda r: r["streams"])
            verdicts.append(_verdict(system, "one token per chunk", first))
        bulk = [r for r in rows if r["system"] == system and r["kind"] == "bulk"]
        if bulk:
            verdicts.append(_verdict(system, "many tokens per chunk (bulk, best cell)", max(bulk, key=_per_core)))
    return "\n".join(
        [
            "# Streaming ceiling: serve_app request path vs a bare FastAPI/uvicorn SSE server",
            "",
            "Simulated engine (never the bottleneck): `bulk` = 100k tok/s per stream, many tokens per chunk; "
            "`per-token` = 100 tok/s per stream, one token per chunk. Closed-loop streams for "
            f"{meta['duration_s']} s per cell; CPU cores = process CPU seconds / wall seconds (psutil). The client "
            "runs on the same 2 cores.",
            "",
            md_table(head, body),
            "",
            "Latency probe (one stream at 100 tok/s = 10 ms between tokens; 5 requests of 100 tokens):",
            "",
            md_table(["system", "TTFT p50 ms", "gap p50 ms", "gap p99 ms", "gap mean ms"], probes),
            "",
            "## Target: ≥ 5,000 tokens/s per gateway core",
            "",
            *verdicts,
            "",
            machine_md(meta["machine"], meta["command"], meta["notes"]),
        ]
    )


def app_variants(fast_paths: list[str], batch_ms: float) -> list[tuple[str, dict[str, str], float]]:
    """(label, env, stream_batch_interval_ms): serve_app as configured, once per Ray fast path, and once
    with the replica batching chunks for `batch_ms` (0: skip)."""
    out: list[tuple[str, dict[str, str], float]] = [("serve_app", {}, 0.0)]
    for fp in fast_paths:
        out.append((f"serve_app + {fp}", fast_path_env(f"app+{fp}"), 0.0))
    if batch_ms > 0:
        out.append((f"serve_app + stream_batch_interval_ms={batch_ms:g}", {}, batch_ms))
    return out


def pools_with_batch(batch_ms: float) -> dict[str, Any]:
    pools = json.loads(json.dumps(POOLS))
    for pool in pools.values():
        pool["deployment"]["stream_batch_interval_ms"] = batch_ms
    return pools


def is_app(system: str) -> bool:
    return system.startswith("serve_app")


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=12.0, help="seconds per cell")
    p.add_argument("--bulk-streams", default="1,4,16")
    p.add_argument("--per-token-streams", default="32,128,512")
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--fast-paths",
        default="ray-defaults",
        help=f"comma list of Ray fast paths to run serve_app with ({', '.join(RAY_FAST_PATHS)}; '' for none)",
    )
    p.add_argument("--batch-interval-ms", type=float, default=5.0, help="one run with this batching (0: skip)")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy the plain serve_app's per-token cell")
    p.add_argument("--max-load", type=float, default=1.0, help="quiet machine: 1-min load below this")
    p.add_argument("--quiet-wait", type=float, default=300.0, help="wait at most this long for a quiet machine")
    p.add_argument("--out", type=Path, default=RESULTS / "streaming_ceiling")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--render", type=Path, help="only re-render summary.md and the chart from a saved run JSON")
    args = p.parse_args()
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        print(write_outputs(doc, doc["rows"], args.out))
        return
    if args.quick:
        args.duration, args.bulk_streams, args.per_token_streams = 6.0, "4", "32,512"
    cells = [("bulk", "fast", int(n), 4000) for n in args.bulk_streams.split(",")]
    cells += [("per-token", "paced", int(n), 500) for n in args.per_token_streams.split(",")]
    meta: dict[str, Any] = {"machine": machine(), "command": command_line(), "duration_s": args.duration}
    meta["notes"] = list(args.note)  # say with --note what else ran on the machine
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    fast_paths = [f.strip() for f in args.fast_paths.split(",") if f.strip()]
    meta["quiet"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        meta["quiet"]["bare FastAPI SSE"] = wait_quiet(args.max_load, args.quiet_wait)
        srv, base = start_baseline(work / "baseline.log")
        try:
            rows += measure("bare FastAPI SSE", base + "/v1/chat/completions", srv.pid, cells, args.duration)
        finally:
            srv.stop()
        routes = {name: {"policy": "self_hosted_only", "pool": name} for name in POOLS}
        for i, (label, env, batch_ms) in enumerate(app_variants(fast_paths, args.batch_interval_ms)):
            cfg = write_config(app_config(pools_with_batch(batch_ms), routes), work / f"app-stream-{i}.yaml")
            meta["quiet"][label] = wait_quiet(args.max_load, args.quiet_wait)
            run = start_app(cfg, work / f"app-{i}.log", env=env)
            prof = RESULTS / f"profile-{stamp}" if args.profile > 0 and i == 0 else None
            try:
                url = run.base_url + "/v1/chat/completions"
                rows += measure(label, url, run.server.pid, cells, args.duration, prof)
            finally:
                run.server.stop()
    meta["total_duration_s"] = round(time.monotonic() - started)
    write_json(args.out / f"run-{stamp}.json", {**meta, "rows": rows})
    print(write_outputs(meta, rows, args.out))


def write_outputs(meta: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> str:
    """summary.md and the chart from one run's rows (also used by --render on a saved run JSON)."""
    md = markdown(rows, meta)
    (out / "summary.md").write_text(md + f"\nTotal duration: {meta['total_duration_s']} s.\n")
    cells = list(dict.fromkeys((r["kind"], r["streams"]) for r in rows if r["kind"] != "probe"))
    labels = [f"{k}\n{n} streams" for k, n in cells]
    grouped_bars(
        out / "tokens_per_s.png",
        labels,
        {
            s: [
                next(r["tokens_per_s"] for r in rows if r["system"] == s and r["kind"] == k and r["streams"] == n)
                for k, n in cells
            ]
            for s in dict.fromkeys(r["system"] for r in rows)
        },
        "delivered tokens/s",
        "Streaming ceiling (simulated engine never the limit)",
    )
    return md


if __name__ == "__main__":
    main()
