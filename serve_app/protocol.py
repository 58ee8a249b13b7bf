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
