"""Where the time to first token goes on serve_app's path when the engine answers at once.

The simulated engine emits its first token with no delay, so a client's TTFT is all path: client → Serve
proxy → Gateway → LLMServer replica → back. For each request the client's TTFT (one SSE client,
serve_app/ops/sse_client.py) is joined by `X-Request-Id` with the Gateway's own TTFT from its request log
line (arrival at the Gateway → first output chunk leaving it): the difference is the proxy's share (both
ways) plus the client; the Gateway's TTFT is its own code plus the Gateway ⇄ replica hops. The bare
FastAPI SSE server (bench/sse_baseline.py, same simulated engine in-process) is the floor.

    python -m bench.ttft_path [--requests 60] [--fast-paths ray-defaults]

Requests run one at a time (concurrency 1), after 10 warm-up requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    command_line,
    machine,
    machine_md,
    md_table,
    median,
    percentile,
    setup_logging,
    write_json,
)
from bench.loadgen import chat_body, new_session, stream_chat
from bench.streaming_ceiling import start_baseline
from bench.systems import app_config, fast_path_env, start_app, write_config

logger = logging.getLogger("bench.ttft_path")
POOL = {
    "engine": "simulated",
    "model": "sim",
    "simulated": {"max_num_seqs": 64, "tokens_per_second": 1000.0, "first_token_delay_s": 0.0},
    "deployment": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 64},
}
_LOG_LINE = re.compile(r'\{"request_id":"(?P<id>[^"]+)".*?"ttft_ms":(?P<ttft>[0-9.]+)')


async def probe(base: str, model: str, n: int, tag: str) -> list[tuple[str, float]]:
    """n sequential streams after 10 warm-ups; (request id, client TTFT ms) for each measured one."""
    out: list[tuple[str, float]] = []
    async with new_session() as session:
        for i in range(10 + n):
            rid = f"{tag}-{i}"
            session.headers["X-Request-Id"] = rid
            res = await stream_chat(session, f"{base}/v1/chat/completions", chat_body(model, 4), 30)
            if res.error is None and res.ttft_s is not None and i >= 10:
                out.append((rid, res.ttft_s * 1000))
    return out


def gateway_ttfts(log_text: str) -> dict[str, float]:
    return {m["id"]: float(m["ttft"]) for m in _LOG_LINE.finditer(log_text)}


def row(label: str, client: list[float], gateway: list[float]) -> dict[str, Any]:
    proxy = [c - g for c, g in zip(client, gateway, strict=True)] if gateway else []
    return {
        "system": label,
        "n": len(client),
        "client_ttft_p50_ms": median(client),
        "client_ttft_p90_ms": percentile(client, 90),
        "gateway_ttft_p50_ms": median(gateway) if gateway else None,
        "proxy_and_client_p50_ms": median(proxy) if proxy else None,
    }


def run_app(label: str, env: dict[str, str], n: int, work: Path) -> dict[str, Any]:
    cfg = write_config(app_config({"p": POOL}, {"m": {"policy": "self_hosted_only", "pool": "p"}}), work / "a.yaml")
    log = work / f"{label.replace(' ', '_')}.log"
    running = start_app(cfg, log, env=env)
    try:
        measured = asyncio.run(probe(running.base_url, running.model, n, label.replace(" ", "_")))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # the last log lines reach the driver's output a moment later
            seen = gateway_ttfts(log.read_text(errors="replace"))
            if all(rid in seen for rid, _ in measured):
                break
            time.sleep(1)
    finally:
        running.server.stop()
    pairs = [(c, seen[rid]) for rid, c in measured if rid in seen]
    logger.info("%s: %d of %d requests joined with a gateway log line", label, len(pairs), len(measured))
    return row(label, [c for c, _ in pairs], [g for _, g in pairs])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=60)
    p.add_argument("--fast-paths", default="ray-defaults", help="serve_app variants besides the shipped one")
    p.add_argument("--out", type=Path, default=RESULTS / "ttft_path")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args()
    setup_logging()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ttft-") as tmp:
        work = Path(tmp)
        srv, base = start_baseline(work / "baseline.log")
        try:
            client = [c for _, c in asyncio.run(probe(base, "fast", args.requests, "bare"))]
        finally:
            srv.stop()
        rows.append(row("bare FastAPI SSE", client, []))
        rows.append(run_app("serve_app", {}, args.requests, work))
        for fp in [f for f in args.fast_paths.split(",") if f]:
            rows.append(run_app(f"serve_app + {fp}", fast_path_env(f"app+{fp}"), args.requests, work))
    m = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "run.json", {"machine": m, "command": command_line(), "rows": rows, "notes": args.note})
    cols = ["system", "n", "client_ttft_p50_ms", "client_ttft_p90_ms", "gateway_ttft_p50_ms", "proxy_and_client_p50_ms"]
    table = md_table(cols, [[r[c] if not isinstance(r[c], float) else round(r[c], 2) for c in cols] for r in rows])
    title = "# TTFT path breakdown (simulated engine, first token at once)"
    text = f"{title}\n\n{table}\n\n{machine_md(m, command_line(), args.note)}"
    (args.out / "summary.md").write_text(text)
    print(text)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
