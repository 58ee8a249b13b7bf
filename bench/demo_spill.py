"""Spill demo: the real SmolLM2 engine (configs/local-spill.yaml) overflowing to the bundled Gemini stand-in.

    make demo-spill        (or: .venv/bin/python -m bench.demo_spill [--requests 48] [--concurrency 24])

Starts the stand-in on 127.0.0.1, serves the app with GEMINI_API_KEY / GEMINI_BASE_URL pointing at it,
sends a burst of concurrent streaming requests, and prints how many each path served (header
x-served-by) and the time to first token on each. Stops everything by pid at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import time
from collections import Counter

import httpx

from bench.localapp import ROOT, running_app_with_standin


def one(url: str, i: int) -> tuple[str, float, int]:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"Tell me a fact about number {i}."}],
        "max_tokens": 48,
        "stream": True,
    }
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        ttft = 0.0
        for line in r.iter_lines():
            if line.startswith("data: ") and not ttft:
                ttft = time.monotonic() - started
        return r.headers.get("x-served-by", f"error {r.status_code}"), ttft, r.status_code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=24)
    args = ap.parse_args()
    with running_app_with_standin(ROOT / "configs/local-spill.yaml") as url:
        print(f"app ready at {url}; sending {args.requests} requests, {args.concurrency} at a time", flush=True)
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda i: one(url, i), range(args.requests)))
    served = Counter(r[0] for r in results)
    print("\nserved by     requests  share   TTFT p50")
    for path, n in sorted(served.items()):
        ttfts = [r[1] for r in results if r[0] == path]
        print(f"{path:<13} {n:>8}  {n / len(results):>5.0%}   {statistics.median(ttfts):.2f} s")
    failed = sum(1 for r in results if r[2] != 200)
    print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
