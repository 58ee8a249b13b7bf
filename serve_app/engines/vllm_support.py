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


# Substrings of vLLM's compact JSON (`model_dump_json`): with no whitespace after ':' a quote is structural, so
# '"usage":' / '"error":' can only be keys, and '"content":"' / '"text":"' open a non-null string value.
_USAGE_KEY = '"usage":'
_ERROR_KEY = '"error":'
_FINISHED = '"finish_reason":"'
_TEXT_OPENERS = ('"content":"', '"text":"')


def quick_carries_output(event: str) -> bool | None:
    """True when a plain stream event certainly carries output (no parse); None when it takes a parse.

    Only positive answers are given: a non-null finish_reason, or a content/text string that is not empty.
    Anything else (role-only deltas, tool calls, reasoning, other spacing) is left to `carries_output`.
    """
    if _FINISHED in event:
        return True
    for opener in _TEXT_OPENERS:
        i = event.find(opener)
        if i >= 0 and event[i + len(opener) : i + len(opener) + 1] not in ('"', ""):
            return True
    return None


class StreamAccounting:
    """Per-stream state: how many of the engine's generated tokens were already attributed to a chunk.

    The common piece (one content event) is read with two substring scans; only the events the scans cannot
    settle (the role chunk, the final usage chunk, errors, tool calls, reasoning) are json-parsed.
    """

    def __init__(self, client_wants_usage: bool) -> None:
        self._client_wants_usage = client_wants_usage
        self._attributed = 0

    def chunk(self, text: str, generated_so_far: int) -> ChunkReply | None:
        """ChunkReply for one piece of vLLM output; `generated_so_far` counts the engine's token ids."""
        end = text.find("\n\n")
        if end == len(text) - 2 and end > 0:  # one event: the way vLLM yields them
            return self._single(text, text[:end], generated_so_far)
        events = [e for e in text.split("\n\n") if e.strip()]
        kept: list[str] = []
        tokens = 0
        usage: dict[str, Any] | None = None
        usage_only = False
        for event in events:
            if event.strip() == f"data: {_DONE}":
                continue
            kept.append(event)
            got, event_usage = self._read(event, generated_so_far)
            tokens += got
            if event_usage is not None:
                usage, usage_only = event_usage, not self._client_wants_usage
        if not kept:
            return None
        return ChunkReply(data="".join(f"{e}\n\n" for e in kept), tokens=tokens, usage=usage, usage_only=usage_only)

    def _single(self, text: str, event: str, generated_so_far: int) -> ChunkReply | None:
        if event.strip() == f"data: {_DONE}":
            return None
        tokens, usage = self._read(event, generated_so_far)
        if usage is not None:
            return ChunkReply(data=text, tokens=tokens, usage=usage, usage_only=not self._client_wants_usage)
        return ChunkReply(data=text, tokens=tokens)

    def _read(self, event: str, generated_so_far: int) -> tuple[int, dict[str, Any] | None]:
        """(tokens attributed to this event, its usage if it is the final usage chunk)."""
        new = generated_so_far - self._attributed
        if event.startswith("data: {") and _USAGE_KEY not in event and _ERROR_KEY not in event:
            if new <= 0:
                return 0, None  # nothing new to attribute, and no usage: what it carries does not matter
            if quick_carries_output(event):
                self._attributed = generated_so_far
                return new, None
        payload = parse_event(event)
        if payload is None or "error" in payload:
            return 0, None  # passes through untouched (mid-stream errors are data for the client)
        choices = payload.get("choices") or []
        if not choices and isinstance(payload.get("usage"), dict):
            return 0, payload["usage"]
        if any(isinstance(c, dict) and carries_output(c) for c in choices):
            self._attributed = max(self._attributed, generated_so_far)
            return max(0, new), None
        return 0, None


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
