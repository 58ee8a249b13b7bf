"""A small streaming load generator (aiohttp): closed-loop and open-loop (Poisson) OpenAI chat streams.

Each request records what a client sees: HTTP status, time to the first content token, token count (from
the final usage chunk), whether the stream ended cleanly, and the `x-served-by` header.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Result:
    start: float
    status: int = 0
    ttft_s: float | None = None
    end: float = 0.0
    tokens: int = 0
    ok: bool = False
    served_by: str | None = None
    error: str | None = None
    gaps_s: list[float] = field(default_factory=list)


def chat_body(model: str, max_tokens: int, prompt: str = "Tell me a story about a fox.") -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _has_content(event: bytes) -> bool:
    # Cheap check: a content delta that is not empty (the role chunk carries "content":"").
    i = event.find(b'"content":"')
    return i >= 0 and event[i + 11 : i + 12] != b'"'


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout_s: float, gaps: bool = False
) -> Result:
    """One streaming request. `gaps` records the time between content events (for latency probes only)."""
    res = Result(start=time.monotonic())
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            res.status = resp.status
            res.served_by = resp.headers.get("x-served-by")
            if resp.status != 200:
                res.error = (await resp.text())[:200]
                return res
            buf = b""
            last = 0.0
            done = False
            async for data in resp.content.iter_any():
                now = time.monotonic()
                buf += data
                *events, buf = buf.split(b"\n\n")
                for ev in events:
                    if ev == b"data: [DONE]":
                        done = True
                        continue
                    if res.ttft_s is None or gaps:
                        if _has_content(ev):
                            if res.ttft_s is None:
                                res.ttft_s = now - res.start
                            elif gaps:
                                res.gaps_s.append(now - last)
                            last = now
                    if b'"usage":{' in ev and b'"completion_tokens"' in ev:
                        usage = json.loads(ev[ev.index(b"{") :]).get("usage") or {}
                        res.tokens = int(usage.get("completion_tokens") or 0)
                    elif b'"error"' in ev and ev.startswith(b'data: {"error"'):
                        res.error = ev[:200].decode(errors="replace")
            res.ok = done and res.error is None
    except (TimeoutError, aiohttp.ClientError) as err:
        res.error = f"{type(err).__name__}: {err}"[:200]
    finally:
        res.end = time.monotonic()
    return res


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
