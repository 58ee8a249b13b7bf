"""The client side of bench/failover.py: one stream read with the shared SSE recorder, plus its text, chunk
ids and the `: serve_app failover ...` comments (with their position among the output chunks)."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field

import httpx

from serve_app.ops.sse_client import StreamRecorder, StreamStats

WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "again.")


def reference(n: int) -> str:
    """The simulated engine's answer for max_tokens=n (serve_app/engines/simulated.py)."""
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(n))


class FailoverRecorder(StreamRecorder):
    """The shared recorder plus what this benchmark needs: the text, chunk ids and the SSE comments."""

    def __init__(self, start: float) -> None:
        super().__init__(start, record_itl=True, record_chunks=True)
        self.text: list[str] = []
        self.ids: set[str] = set()
        self.comments: list[tuple[float, int, str]] = []  # (arrival, output chunks before it, line)
        self._lines = b""

    def feed(self, data: bytes, now: float) -> None:
        # The same framing as SSEDecoder, block by block, so a comment is ordered among the data events
        # that arrived in the same read.
        self._lines += data.replace(b"\r\n", b"\n")
        *blocks, self._lines = self._lines.split(b"\n\n")
        for block in blocks:
            data_lines = []
            for ln in block.split(b"\n"):
                if ln.startswith(b":"):
                    self.comments.append((now, len(self.stats.chunks), ln.decode(errors="replace")))
                elif ln.startswith(b"data:"):
                    ln = ln[5:]
                    data_lines.append(ln[1:] if ln.startswith(b" ") else ln)
            if data_lines:
                self.event(b"\n".join(data_lines).decode(), now)

    def event(self, payload: str, now: float) -> None:
        super().event(payload, now)
        if payload == "[DONE]":
            return
        with contextlib.suppress(ValueError):
            obj = json.loads(payload)
            if isinstance(obj, dict):
                if isinstance(obj.get("id"), str):
                    self.ids.add(obj["id"])
                for choice in obj.get("choices") or ():
                    delta = choice.get("delta") if isinstance(choice, dict) else None
                    piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    self.text.append(piece or "")


@dataclass
class StreamResult:
    index: int
    request_id: str
    max_tokens: int
    started_at: float  # seconds since the run started
    stats: StreamStats
    text: str
    ids: int
    comments: list[tuple[float, int, str]] = field(default_factory=list)

    def stalls(self) -> list[float]:
        """Per failover comment: first output chunk after it minus the last output chunk before it."""
        out = []
        chunks = self.stats.chunks
        for _, before, _line in self.comments:
            if 0 < before < len(chunks):
                out.append(chunks[before][0] - chunks[before - 1][0])
        return out


async def one_stream(
    client: httpx.AsyncClient, url: str, index: int, run_id: str, max_tokens: int, prompt: str, t0: float, model: str
) -> StreamResult:
    request_id = f"{run_id}-{index:04d}"
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.monotonic()
    rec = FailoverRecorder(start)
    try:
        async with client.stream("POST", url, json=body, headers={"X-Request-Id": request_id}) as resp:
            rec.response(resp.status_code, resp.headers)
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                rec.finish(time.monotonic(), f"HTTP {resp.status_code}: {text[:200]}")
            else:
                async for data in resp.aiter_bytes():
                    rec.feed(data, time.monotonic())
                rec.finish(time.monotonic())
    except httpx.HTTPError as err:
        rec.finish(time.monotonic(), f"{type(err).__name__}: {err}"[:200])
    return StreamResult(
        index, request_id, max_tokens, start - t0, rec.stats, "".join(rec.text), len(rec.ids), rec.comments
    )
