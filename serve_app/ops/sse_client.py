"""One SSE client for every load tool (`serve-app trace`, bench/loadgen.py, bench/demo_spill.py).

One definition of what a client measures on an OpenAI-style stream (chat or completions):

- an **output chunk** is an event whose choices carry output: a non-empty `delta.content`,
  `delta.reasoning_content`, `delta.tool_calls` or (completions) `text`. The role-only first chunk
  (`"content": ""`) and the usage-only last chunk (`"choices": []`) are not output chunks;
- **TTFT** = time from sending the request to the arrival of the first output chunk; a stream that
  finishes without any output (a `finish_reason` before any content) gets its TTFT from that chunk;
- **ITL** = the gaps between consecutive output chunks (one per chunk, not per token: a chunk that
  carries several tokens is one gap, as in `vllm bench serve`);
- **tokens** = `usage.completion_tokens` when the stream reports usage, else the number of output pieces;
- an `{"error": ...}` event inside a 200 stream is an error, and so is a stream without `data: [DONE]`.

`SSEDecoder` and `StreamRecorder` do no I/O (bytes and timestamps in), so any transport can feed them;
`stream_post` is the httpx transport that the tools use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

DONE = "[DONE]"
_OUTPUT_DELTA_KEYS = ("content", "reasoning_content", "reasoning", "tool_calls")


@dataclass(frozen=True)
class ChunkInfo:
    """What one decoded event carries."""

    pieces: int = 0  # choices with output (≈ tokens when the engine streams one token per chunk)
    finished: bool = False  # some choice has a finish_reason
    usage_tokens: int | None = None  # usage.completion_tokens, when present
    error: str | None = None  # the message of an {"error": ...} event


def classify(event: Mapping[str, Any]) -> ChunkInfo:
    """Classify one decoded `data:` JSON object of an OpenAI chat or completions stream."""
    if "error" in event:
        err = event["error"]
        msg = err.get("message") if isinstance(err, Mapping) else err
        return ChunkInfo(error=str(msg or "error event"))
    pieces, finished = 0, False
    for choice in event.get("choices") or ():
        if not isinstance(choice, Mapping):
            continue
        delta = choice.get("delta")
        if isinstance(delta, Mapping) and any(delta.get(k) for k in _OUTPUT_DELTA_KEYS):
            pieces += 1
        elif choice.get("text"):
            pieces += 1
        if choice.get("finish_reason") is not None:
            finished = True
    usage = event.get("usage")
    completion = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    return ChunkInfo(pieces, finished, completion if isinstance(completion, int) else None)


class SSEDecoder:
    """Incremental Server-Sent-Events decoder: bytes in, the `data` field of each complete event out.

    Events end at a blank line (LF or CRLF); several `data:` lines of one event are joined with a newline;
    comments (`:`) and other fields (`event:`, `id:`) are skipped.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        self._buf += data
        if b"\r" in self._buf:
            self._buf = self._buf.replace(b"\r\n", b"\n")
        *events, self._buf = self._buf.split(b"\n\n")
        out = []
        for ev in events:
            lines = [ln[5:] for ln in ev.split(b"\n") if ln.startswith(b"data:")]
            if lines:
                out.append(b"\n".join(ln[1:] if ln.startswith(b" ") else ln for ln in lines).decode())
        return out


@dataclass
class StreamStats:
    """One streamed request as the client saw it. Times are in the recorder's clock units."""

    start: float
    status: int = 0
    served_by: str | None = None  # the x-served-by response header
    first_output_at: float | None = None
    end: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, pieces) per output chunk
    pieces: int = 0
    usage_tokens: int | None = None
    done: bool = False  # saw data: [DONE]
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_output_at is None else self.first_output_at - self.start

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.pieces

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.done and self.error is None


class StreamRecorder:
    """Turns the bytes of one response into `StreamStats` (no I/O; `now` comes with every read)."""

    def __init__(self, start: float, record_itl: bool = True, record_chunks: bool = False) -> None:
        self.stats = StreamStats(start=start)
        self._decoder = SSEDecoder()
        self._record_itl = record_itl
        self._record_chunks = record_chunks
        self._last_output: float | None = None

    def response(self, status: int, headers: Mapping[str, str]) -> None:
        self.stats.status = status
        self.stats.served_by = headers.get("x-served-by")

    def feed(self, data: bytes, now: float) -> None:
        """Bytes of the response body that arrived at `now`."""
        for payload in self._decoder.feed(data):
            self.event(payload, now)

    def event(self, payload: str, now: float) -> None:
        s = self.stats
        if payload == DONE:
            s.done = True
            return
        try:
            obj = json.loads(payload)
        except ValueError:
            s.error = s.error or f"not JSON: {payload[:80]!r}"
            return
        info = classify(obj) if isinstance(obj, Mapping) else ChunkInfo(error="not a JSON object")
        if info.error is not None:
            s.error = s.error or info.error
            return
        if info.usage_tokens is not None:
            s.usage_tokens = info.usage_tokens
        if info.pieces:
            if s.first_output_at is None:
                s.first_output_at = now
            elif self._record_itl and self._last_output is not None:
                s.itl_s.append(now - self._last_output)
            self._last_output = now
            s.pieces += info.pieces
            if self._record_chunks:
                s.chunks.append((now, info.pieces))
        elif info.finished and s.first_output_at is None:
            s.first_output_at = now  # an empty answer: its "first token" is the finish

    def finish(self, now: float, error: str | None = None) -> StreamStats:
        s = self.stats
        s.end = now
        if error is not None:
            s.error = s.error or error
        elif s.status == 200 and not s.done:
            s.error = s.error or "stream ended without [DONE]"
        return s


async def stream_post(
    client: httpx.AsyncClient,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    recorder: StreamRecorder | None = None,
    record_itl: bool = True,
) -> StreamStats:
    """POST `body` and read the SSE answer into a `StreamStats`.

    HTTP errors and transport errors end up in `.error` (never raised). Pass your own `recorder` to see
    the partial stats when the task is cancelled (cancellation is re-raised).
    """
    rec = recorder or StreamRecorder(clock(), record_itl=record_itl)
    try:
        async with client.stream("POST", url, json=dict(body), headers=dict(headers or {})) as resp:
            rec.response(resp.status_code, resp.headers)
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return rec.finish(clock(), f"HTTP {resp.status_code}: {text[:200]}")
            async for data in resp.aiter_bytes():
                rec.feed(data, clock())
                if rec.stats.done:
                    break
    except httpx.HTTPError as err:
        return rec.finish(clock(), f"{type(err).__name__}: {err}"[:200])
    return rec.finish(clock())
