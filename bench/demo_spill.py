"""Spill demo: the real SmolLM2 engine (configs/local-spill.yaml) overflowing to the bundled Gemini stand-in.

    make demo-spill        (or: .venv/bin/python -m bench.demo_spill [--requests 48] [--concurrency 24])

Starts the stand-in on 127.0.0.1, serves the app with GEMINI_API_KEY / GEMINI_BASE_URL pointing at it,
sends a burst of concurrent streaming requests (the shared SSE client, serve_app.ops.sse_client), and
prints how many each path served (header x-served-by) and the time to first token (first chunk that
carries output) on each. Stops everything by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections import Counter

import httpx

from bench.localapp import ROOT, running_app_with_standin
from serve_app.ops.sse_client import StreamStats, stream_post


def body(i: int) -> dict[str, object]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Tell me a fact about number {i}."}],
        "max_tokens": 48,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def burst(url: str, requests: int, concurrency: int) -> list[StreamStats]:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:

        async def one(i: int) -> StreamStats:
            async with gate:
                return await stream_post(client, f"{url}/v1/chat/completions", body(i))

        return list(await asyncio.gather(*(one(i) for i in range(requests))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=24)
    args = ap.parse_args()
    with running_app_with_standin(ROOT / "configs/local-spill.yaml") as url:
        print(f"app ready at {url}; sending {args.requests} requests, {args.concurrency} at a time", flush=True)
        results = asyncio.run(burst(url, args.requests, args.concurrency))
    served = Counter(r.served_by or f"error {r.status}" for r in results)
    print("\nserved by     requests  share   TTFT p50")
    for path, n in sorted(served.items()):
        ttfts = [r.ttft_s for r in results if (r.served_by or f"error {r.status}") == path and r.ttft_s is not None]
        p50 = f"{statistics.median(ttfts):.2f} s" if ttfts else "-"
        print(f"{path:<13} {n:>8}  {n / len(results):>5.0%}   {p50}")
    failed = [r for r in results if not r.ok]
    print(f"failed: {len(failed)}" + (f" (first: {failed[0].error})" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
