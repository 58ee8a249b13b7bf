"""Overload: offered load stepping to 3x the self-hosted pool's capacity, spill off vs spill on.

One serve_app instance, one simulated pool with a realistic capacity model (8 sequences at 30 tok/s, 0.2 s
to the first token) and two routes on it: `spill-off` (self_hosted_only) and `spill-on` (spill to the
Gemini stand-in at 300 ms first token, 100 tok/s, through the real google-genai SDK). Each step is an
open-loop Poisson load for a fixed time; a step ends when all its requests have finished (no carry-over).

    python -m bench.overload [--step-seconds 20] [--steps 0.25,0.5,1,2,3] [--quick]
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

from bench.charts import lines
from bench.common import (
    PYTHON,
    RESULTS,
    Server,
    command_line,
    free_port,
    http_json,
    http_ok,
    machine,
    machine_md,
    md_table,
    percentile,
    setup_logging,
    write_json,
)
from bench.loadgen import Result, chat_body, open_loop
from bench.streaming_ceiling import cpu_seconds, process_groups
from bench.systems import app_config, start_app, write_config

logger = logging.getLogger("bench.overload")

MAX_NUM_SEQS, TOKENS_PER_S, FIRST_TOKEN_S = 8, 30.0, 0.2
MAX_TOKENS = 48
GEMINI_LATENCY_MS, GEMINI_TOKENS_PER_S = 300.0, 100.0
# ~44 words: the stand-in replies with "Gemini stand-in reply: " + these words (one word = one token), so
# its reply is capped by max_tokens at the same 48 tokens the pool produces.
PROMPT = " ".join(["Summarize the quarterly report for the operations team in plain words please"] * 4)
API_KEY = "bench-standin-key"  # a throwaway key shared by the app and the local stand-in only


def capacity_rps() -> float:
    """Requests/s the pool completes when full: max_num_seqs / (prefill + decode time per request)."""
    return MAX_NUM_SEQS / (FIRST_TOKEN_S + MAX_TOKENS / TOKENS_PER_S)


def pool() -> dict[str, Any]:
    return {
        "engine": "simulated",
        "model": "sim",
        "served_model_name": "sim-smollm2",
        "simulated": {
            "max_num_seqs": MAX_NUM_SEQS,
            "tokens_per_second": TOKENS_PER_S,
            "first_token_delay_s": FIRST_TOKEN_S,
        },
        "deployment": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 64, "max_queued_requests": 64},
    }


def routes() -> dict[str, Any]:
    # The first route that names the pool sets its saturation thresholds (PoolMonitor.configure).
    return {
        "spill-on": {
            "policy": "spill",
            "pool": "sim",
            "gemini_model": "gemini-2.5-flash",
            "saturation": {"max_inflight_per_replica": MAX_NUM_SEQS, "max_waiting_per_replica": 1},
        },
        "spill-off": {"policy": "self_hosted_only", "pool": "sim"},
    }


async def poll_pools(url: str, stop: asyncio.Event, out: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        try:
            snap = await asyncio.to_thread(http_json, url, 2.0)
            out.append({"t": time.monotonic(), **snap["pools"]["sim"]})
        except Exception:  # a missed sample is fine
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def run_step(
    base: str, alias: str, rate: float, duration: float, seed: int
) -> tuple[list[Result], list[dict[str, Any]]]:
    samples: list[dict[str, Any]] = []
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_pools(base + "/admin/pools", stop, samples))
    body = chat_body(alias, MAX_TOKENS, PROMPT)
    results = await open_loop(base + "/v1/chat/completions", body, rate, duration, timeout_s=120, seed=seed)
    stop.set()
    await poller
    return results, samples


def summarize_step(
    mode: str, mult: float, rate: float, results: list[Result], samples: list[dict[str, Any]], step_s: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.status else "conn"
        if r.status == 200 and not r.ok:
            key = "200-broken"
        statuses[key] = statuses.get(key, 0) + 1
    util = [s["running"] / MAX_NUM_SEQS for s in samples if s.get("running") is not None]
    spilled = sum(1 for r in ok if r.served_by == "gemini")
    by_route = {
        route: [r.ttft_s * 1000 for r in ok if r.served_by == route and r.ttft_s is not None]
        for route in ("self-hosted", "gemini")
    }
    return {
        "mode": mode,
        "load_x_capacity": mult,
        "offered_rps": rate,
        "requests": len(results),
        "ok": len(ok),
        "success_rate": len(ok) / len(results) if results else None,
        "statuses": statuses,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "spilled_share": spilled / len(ok) if ok else None,
        "ttft_p99_self_hosted_ms": percentile(by_route["self-hosted"], 99),
        "ttft_p99_gemini_ms": percentile(by_route["gemini"], 99),
        "ttft_p50_gemini_ms": percentile(by_route["gemini"], 50),
        "pool_utilisation_mean": sum(util) / len(util) if util else None,
        "pool_waiting_max": max((s.get("waiting") or 0 for s in samples), default=None),
        "goodput_rps": len(ok) / step_s,
        "step_wall_s": round(max((r.end for r in results), default=0) - min((r.start for r in results), default=0), 1),
    }


def _pair(a: float | None, b: float | None, fmt: str = "{:,.0f}") -> str | None:
    return None if a is None or b is None else f"{fmt.format(a)} / {fmt.format(b)}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = [
        "mode",
        "load x capacity",
        "offered req/s",
        "requests",
        "success %",
        "HTTP statuses",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "p99 self-hosted",
        "Gemini p99 / p50",
        "spilled %",
        "pool util (mean)",
        "max waiting",
        "gateway / proxy cores",
    ]
    body = [
        [
            r["mode"],
            r["load_x_capacity"],
            r["offered_rps"],
            r["requests"],
            100 * (r["success_rate"] or 0),
            " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items())),
            r["ttft_p50_ms"],
            r["ttft_p99_ms"],
            r["ttft_p99_self_hosted_ms"],
            _pair(r["ttft_p99_gemini_ms"], r["ttft_p50_gemini_ms"]),
            None if r["spilled_share"] is None else 100 * r["spilled_share"],
            r["pool_utilisation_mean"],
            r["pool_waiting_max"],
            _pair(r.get("gateway_cores"), r.get("proxy_cores"), "{:.2f}"),
        ]
        for r in rows
    ]
    on = [r for r in rows if r["mode"] == "spill-on"]
    base = on[0]["ttft_p99_ms"] if on else None
    failed = sum(r["requests"] - r["ok"] for r in on)
    worst = max((r["ttft_p99_ms"] or 0 for r in on), default=0)
    ratio = worst / base if base else None
    verdict = [
        f"- spill on: failed requests across all steps = {failed} (target 0: {'met' if failed == 0 else 'NOT met'})",
        f"- spill on: worst step p99 TTFT {worst:,.0f} ms vs unloaded ({on[0]['load_x_capacity'] if on else '?'}x "
        f"capacity) p99 {base or 0:,.0f} ms = {ratio or 0:.2f}x (target ≤ 2x: "
        f"{'met' if ratio is not None and ratio <= 2 else 'NOT met'})",
    ]
    return "\n".join(
        [
            "# Overload: spill off vs spill on",
            "",
            f"Simulated pool: max_num_seqs {MAX_NUM_SEQS}, {TOKENS_PER_S:g} tok/s per sequence, first token "
            f"{FIRST_TOKEN_S} s, {MAX_TOKENS} output tokens per request → capacity {capacity_rps():.2f} req/s. "
            f"Gemini stand-in: {GEMINI_LATENCY_MS:g} ms to the first token, {GEMINI_TOKENS_PER_S:g} tok/s, through "
            "google-genai. Open-loop Poisson arrivals, "
            f"{meta['step_s']:g} s per step (the lowest step runs for ≥ 50 requests); "
            f"spill-on thresholds max_inflight_per_replica {MAX_NUM_SEQS}, "
            "max_waiting_per_replica 1. Failed = not HTTP 200 or a stream that did not end cleanly.",
            "",
            md_table(head, body),
            "",
            "## Targets",
            "",
            *verdict,
            "",
            machine_md(meta["machine"], meta["command"], meta["notes"]),
        ]
    )


def start_standin(log: Path) -> tuple[Server, str]:
    port = free_port()
    srv = Server(
        "gemini-standin",
        [
            PYTHON,
            "-m",
            "serve_app.testing.gemini_standin",
            "--port",
            str(port),
            "--latency-ms",
            str(GEMINI_LATENCY_MS),
            "--tokens-per-second",
            str(GEMINI_TOKENS_PER_S),
        ],
        log,
        env={"GEMINI_API_KEY": API_KEY},
    )
    srv.start()
    base = f"http://127.0.0.1:{port}"
    srv.wait_ready(lambda: http_ok(base + "/_control"), 60)
    return srv, base


def main() -> None:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--steps", default="0.25,0.5,1,2,3", help="offered load as multiples of the pool's capacity")
    p.add_argument("--modes", default="spill-off,spill-on")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "overload")
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--render", type=Path, help="only re-render summary.md and the chart from a saved run JSON")
    args = p.parse_args()
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        print(write_outputs(doc, doc["rows"], args.out))
        return
    if args.quick:
        args.step_seconds, args.steps = 8.0, "0.25,3"
    mults = [float(x) for x in args.steps.split(",")]
    meta: dict[str, Any] = {"machine": machine(), "command": command_line(), "step_s": args.step_seconds}
    meta["notes"] = list(args.note)  # say with --note what else ran on the machine
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        work = Path(tmp)
        standin, standin_url = start_standin(work / "standin.log")
        try:
            gemini = {"api_key_env": "GEMINI_API_KEY", "base_url": standin_url, "timeout_s": 30}
            cfg = write_config(app_config({"sim": pool()}, routes(), gemini), work / "app-overload.yaml")
            os.environ.pop("GEMINI_BASE_URL", None)  # the config's base_url must win
            run = start_app(cfg, work / "app.log", env={"GEMINI_API_KEY": API_KEY})
            groups = process_groups(run.server.pid)
            try:
                for mode in args.modes.split(","):
                    for i, mult in enumerate(mults):
                        rate = mult * capacity_rps()
                        # The lowest step is the unloaded reference: give its p99 at least ~50 requests.
                        step_s = max(args.step_seconds, 50 / rate) if i == 0 else args.step_seconds
                        before, t0 = cpu_seconds(groups), time.monotonic()
                        results, samples = asyncio.run(run_step(run.base_url, mode, rate, step_s, seed=i))
                        after, wall = cpu_seconds(groups), time.monotonic() - t0
                        row = summarize_step(mode, mult, rate, results, samples, step_s)
                        row["gateway_cores"] = (after["gateway"] - before["gateway"]) / wall
                        row["proxy_cores"] = (after["proxy"] - before["proxy"]) / wall
                        row["replica_cores"] = (after["replica"] - before["replica"]) / wall
                        logger.info(
                            "%s %.2fx: %s",
                            mode,
                            mult,
                            {
                                k: row[k]
                                for k in ("success_rate", "ttft_p50_ms", "ttft_p99_ms", "spilled_share", "statuses")
                            },
                        )
                        rows.append(row)
                        time.sleep(2.0)
            finally:
                run.server.stop()
        finally:
            standin.stop()
    meta["total_duration_s"] = round(time.monotonic() - started)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(args.out / f"run-{stamp}.json", {**meta, "capacity_rps": capacity_rps(), "rows": rows})
    print(write_outputs(meta, rows, args.out))


def write_outputs(meta: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> str:
    """summary.md and the chart from one run's rows (also used by --render on a saved run JSON)."""
    md = markdown(rows, meta)
    (out / "summary.md").write_text(md + f"\nTotal duration: {meta['total_duration_s']} s.\n")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    mults = list(dict.fromkeys(r["load_x_capacity"] for r in rows))
    series: dict[str, list[float | None]] = {}
    right: dict[str, list[float | None]] = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        series[f"{mode} TTFT p99 (ms)"] = [r["ttft_p99_ms"] for r in mine]
        right[f"{mode} success %"] = [100 * (r["success_rate"] or 0) for r in mine]
    lines(
        out / "overload.png",
        mults,
        series,
        "offered load (x pool capacity)",
        "TTFT p99 ms (log)",
        "Overload: spill off vs spill on",
        right=right,
        right_label="success %",
        log_y=True,
    )
    return md


if __name__ == "__main__":
    main()
