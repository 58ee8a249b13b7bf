"""The vLLM engine's bookkeeping, kept free of vllm imports so it is cheap to test.

- StreamAccounting turns the SSE text vLLM's serving layer yields into ChunkReply items. vLLM renders each
  chunk itself; we leave the text as it is and only read it: drop `data: [DONE]` (the gateway writes it
  once), find the final usage chunk, and attribute generated tokens to the chunks that carry output.
- Tracker / tracked count the token ids the engine generates for one API call and remember which engine
  requests are still open, so a closed stream can abort them.
- LoadState holds the latest scheduler numbers reported by vLLM's stat-logger hook.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import os
from collections.abc import AsyncGenerator
from typing import Any

from serve_app.protocol import ChunkReply

_DONE = "[DONE]"
_GIB = 1 << 30


def parse_event(event: str) -> dict[str, Any] | None:
    """The JSON payload of one `data: {...}` event, or None if it is not one."""
    line = event.strip()
    if not line.startswith("data:"):
        return None
    try:
        payload = json.loads(line[len("data:") :].strip())
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def carries_output(choice: dict[str, Any]) -> bool:
    """Whether a chat/completion stream choice holds generated tokens (role-only deltas do not).

    A finish_reason counts: the chunk that ends a choice carries its last token (e.g. the EOS token,
    which produces no text).
    """
    if choice.get("finish_reason") is not None:
        return True
    if choice.get("text"):  # completions
        return True
    delta = choice.get("delta") or {}
    return bool(
        delta.get("content") or delta.get("reasoning") or delta.get("reasoning_content") or delta.get("tool_calls")
    )


class StreamAccounting:
    """Per-stream state: how many of the engine's generated tokens were already attributed to a chunk."""

    def __init__(self, client_wants_usage: bool) -> None:
        self._client_wants_usage = client_wants_usage
        self._attributed = 0

    def chunk(self, text: str, generated_so_far: int) -> ChunkReply | None:
        """ChunkReply for one piece of vLLM output; `generated_so_far` counts the engine's token ids."""
        events = [e for e in text.split("\n\n") if e.strip()]
        kept: list[str] = []
        tokens = 0
        usage: dict[str, Any] | None = None
        usage_only = False
        for event in events:
            if event.strip() == f"data: {_DONE}":
                continue
            kept.append(event)
            payload = parse_event(event)
            if payload is None or "error" in payload:
                continue  # passes through untouched (mid-stream errors are data for the client)
            choices = payload.get("choices") or []
            if not choices and isinstance(payload.get("usage"), dict):
                usage = payload["usage"]
                usage_only = not self._client_wants_usage
            elif any(isinstance(c, dict) and carries_output(c) for c in choices):
                tokens += max(0, generated_so_far - self._attributed)
                self._attributed = max(self._attributed, generated_so_far)
        if not kept:
            return None
        return ChunkReply(data="".join(f"{e}\n\n" for e in kept), tokens=tokens, usage=usage, usage_only=usage_only)


# ------------------------------------------------------------------------------------ token tracking
@dataclasses.dataclass(slots=True)
class Tracker:
    """Generated tokens and unfinished engine requests of one API call (n>1 and batches included)."""

    tokens: int = 0
    open_ids: set[str] = dataclasses.field(default_factory=set)


# Set around the call into the serving layer; the engine's generate() picks it up when it is called.
TRACKER: contextvars.ContextVar[Tracker | None] = contextvars.ContextVar("serve_app_vllm_tracker", default=None)


async def tracked(stream: AsyncGenerator[Any, None], tracker: Tracker, request_id: str) -> AsyncGenerator[Any, None]:
    tracker.open_ids.add(request_id)
    try:
        async for out in stream:
            # Streams run in DELTA mode (token_ids are new tokens); non-streams get one final output.
            tracker.tokens += sum(len(o.token_ids) for o in out.outputs)
            if out.finished:
                tracker.open_ids.discard(request_id)
            yield out
    finally:
        # vLLM's stream generator does not close the engine generator when it is itself closed;
        # closing it here makes AsyncLLM.generate abort the request at once instead of at GC time.
        await stream.aclose()


@dataclasses.dataclass(slots=True)
class LoadState:
    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0
    generated_tokens_total: int = 0


def apply_kv_cache_space(gib: float | None) -> dict[str, Any]:
    if gib is None:
        return {}
    if float(gib).is_integer():
        # The CPU platform reads this (whole GiB) and overrides kv_cache_memory_bytes with it.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(gib))
    else:
        # A fractional size only fits kv_cache_memory_bytes; a stale env value would override it.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return {"kv_cache_memory_bytes": int(gib * _GIB)}
