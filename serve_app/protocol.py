"""What travels between the engines and the gateway, and how the gateway writes it to the wire.

An engine call yields `Reply` items. The first item decides the response: an `ErrorReply` (nothing was
generated), a `JSONReply` (a whole non-streaming response), or the first `ChunkReply` of a stream.
ChunkReply.data is ready-to-send SSE text ("data: {...}\n\n", possibly several events); `[DONE]` is never
inside it: the gateway writes it exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

DONE = "data: [DONE]\n\n"


@dataclass(slots=True)
class ErrorReply:
    status: int
    body: dict[str, Any]


@dataclass(slots=True)
class JSONReply:
    body: dict[str, Any]


@dataclass(slots=True)
class ChunkReply:
    data: str
    tokens: int = 0  # completion tokens carried by these events (0 for role-only / usage-only chunks)
    usage: dict[str, Any] | None = None  # set on the chunk that carries the final usage
    usage_only: bool = False  # a usage chunk the client did not ask for (the gateway drops it)


Reply = ErrorReply | JSONReply | ChunkReply


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass(slots=True)
class EngineLoad:
    """The load numbers every engine reports (the vLLM scheduler's, or the simulator's)."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    generated_tokens_total: int = 0
    healthy: bool = True
    extra: dict[str, float] = field(default_factory=dict)


def sse(payload: dict[str, Any]) -> str:
    """One SSE event carrying a JSON payload."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_error(status: int, body: dict[str, Any]) -> str:
    """The one error event a stream ends with when something fails after the first byte."""
    err = dict(body.get("error", {}))
    err.setdefault("code", status)
    return sse({"error": err})


def wants_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, dict) and bool(opts.get("include_usage"))


ERROR_MARK = '{"error"'  # how an error event starts (vLLM and ours); generated text never contains it raw


def split_inband_error(chunk: ChunkReply) -> tuple[ChunkReply | None, ErrorReply | None]:
    """Split a chunk at an in-band error event (`data: {"error": ...}` inside a 200 stream, as vLLM sends
    engine failures): the events before it, and the error as an ErrorReply. Cheap when there is none."""
    if ERROR_MARK not in chunk.data:
        return chunk, None
    kept: list[str] = []
    for event in chunk.data.split("\n\n"):
        line = event.strip()
        if not line:
            continue
        if line.startswith("data:") and line[5:].lstrip().startswith(ERROR_MARK):
            try:
                payload = json.loads(line[5:])
            except ValueError:
                payload = {"error": {"message": "malformed error event"}}
            err = payload.get("error") if isinstance(payload, dict) else None
            err = err if isinstance(err, dict) else {"message": str(err)}
            code = err.get("code")
            status = code if isinstance(code, int) and 400 <= code <= 599 else 500
            before = ChunkReply("".join(f"{e}\n\n" for e in kept), tokens=chunk.tokens) if kept else None
            return before, ErrorReply(status, {"error": err})
        kept.append(line)
    return chunk, None
