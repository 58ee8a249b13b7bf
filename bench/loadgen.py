"""A small streaming load generator (aiohttp): closed-loop and open-loop (Poisson) OpenAI chat streams.

Each request is read by the shared SSE parser (`serve_app.ops.sse_client.StreamRecorder`: one definition of
TTFT = first chunk that carries output, ITL = gaps between output chunks, tokens from the usage chunk,
error events inside a 200 stream, `x-served-by`), the same one `serve-app trace` and the spill demo use.
Only the transport differs: aiohttp here, because this client runs at up to ~50k chunks/s on the same two
cores as the system under test and aiohttp's read loop costs less CPU per chunk than httpx's.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import aiohttp

from serve_app.ops.sse_client import StreamRecorder, StreamStats

Result = StreamStats  # what every bench scenario gets back per request


def chat_body(model: str, max_tokens: int, prompt: str = "Tell me a story about a fox.") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout_s: float, gaps: bool = False
) -> Result:
    """One streaming request. `gaps` keeps the inter-chunk gaps (`itl_s`; for latency probes)."""
    rec = StreamRecorder(time.monotonic(), record_itl=gaps)
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            rec.response(resp.status, resp.headers)
            if resp.status != 200:
                return rec.finish(time.monotonic(), f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for data in resp.content.iter_any():
                rec.feed(data, time.monotonic())
    except (TimeoutError, aiohttp.ClientError) as err:
        return rec.finish(time.monotonic(), f"{type(err).__name__}: {err}"[:200])
    return rec.finish(time.monotonic())


def new_session(limit: int = 2000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False))


async def closed_loop(
    url: str, body: dict[str, Any], streams: int, duration_s: float, timeout_s: float
) -> list[Result]:
    """`streams` clients, each sending the next request when the last one ends, until `duration_s` passed."""
    results: list[Result] = []
    deadline = time.monotonic() + duration_s
    async with new_session() as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                results.append(await stream_chat(session, url, body, timeout_s))

        await asyncio.gather(*(client() for _ in range(streams)))
    return results


async def open_loop(
    url: str, body: dict[str, Any], rate_per_s: float, duration_s: float, timeout_s: float, seed: int
) -> list[Result]:
    """Poisson arrivals at `rate_per_s` for `duration_s`, regardless of how fast the server answers."""
    rng = random.Random(seed)
    tasks: list[asyncio.Task[Result]] = []
    async with new_session() as session:
        start = time.monotonic()
        t = 0.0
        while True:
            t += rng.expovariate(rate_per_s)
            if t >= duration_s:
                break
            await asyncio.sleep(max(0.0, start + t - time.monotonic()))
            tasks.append(asyncio.create_task(stream_chat(session, url, body, timeout_s)))
        return list(await asyncio.gather(*tasks))
