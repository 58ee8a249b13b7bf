"""The vLLM engine's pure bookkeeping: chunk accounting, token tracking, KV-cache sizing."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pytest

from serve_app.engines.vllm_support import (
    StreamAccounting,
    Tracker,
    apply_kv_cache_space,
    carries_output,
    parse_event,
    tracked,
)


def ev(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


ROLE = ev({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
TEXT = ev({"choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": None}]})
FINISH = ev({"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]})
USAGE = ev({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
ERROR = ev({"error": {"message": "boom", "type": "InternalServerError", "code": 500}})
DONE = "data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}, False),
        ({"delta": {"content": "x"}, "finish_reason": None}, True),
        ({"delta": {"content": ""}, "finish_reason": "stop"}, True),
        ({"delta": {"tool_calls": [{"index": 0}]}, "finish_reason": None}, True),
        ({"delta": {"reasoning": "hm"}, "finish_reason": None}, True),
        ({"text": " Paris", "finish_reason": None}, True),
        ({"text": "", "finish_reason": None}, False),
    ],
)
def test_carries_output(choice: dict[str, Any], expected: bool) -> None:
    assert carries_output(choice) is expected


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ('data: {"a": 1}', {"a": 1}),
        ("data: [DONE]", None),
        (": keep-alive", None),
        ("data: [1, 2]", None),
    ],
)
def test_parse_event(event: str, expected: dict[str, Any] | None) -> None:
    assert parse_event(event) == expected


@pytest.mark.parametrize(
    ("wants_usage", "steps", "expected"),
    [
        # (text, tokens generated so far) -> (tokens, usage set, usage_only) or None when dropped
        (
            False,
            [(ROLE, 1), (TEXT, 1), (FINISH, 2), (USAGE, 2), (DONE, 2)],
            [(0, False, False), (1, False, False), (1, False, False), (0, True, True), None],
        ),
        (
            True,
            [(ROLE, 1), (TEXT, 1), (FINISH, 2), (USAGE, 2)],
            [(0, False, False), (1, False, False), (1, False, False), (0, True, False)],
        ),
        # Several tokens behind one chunk (e.g. a multi-byte character held back by the detokenizer).
        (False, [(ROLE, 0), (TEXT, 3)], [(0, False, False), (3, False, False)]),
        # An error event mid-stream passes through as data.
        (False, [(TEXT, 1), (ERROR, 1)], [(1, False, False), (0, False, False)]),
    ],
)
def test_stream_accounting(
    wants_usage: bool, steps: list[tuple[str, int]], expected: list[tuple[int, bool, bool] | None]
) -> None:
    acc = StreamAccounting(wants_usage)
    got = []
    for text, generated in steps:
        chunk = acc.chunk(text, generated)
        if chunk is None:
            got.append(None)
            continue
        assert chunk.data == text  # vLLM's rendering is passed on untouched
        got.append((chunk.tokens, chunk.usage is not None, chunk.usage_only))
    assert got == expected


def test_done_is_stripped_from_a_multi_event_piece() -> None:
    chunk = StreamAccounting(False).chunk(TEXT + DONE, 1)
    assert chunk is not None and chunk.data == TEXT


@dataclass
class FakeOutput:
    token_ids: list[int]


@dataclass
class FakeRequestOutput:
    outputs: list[FakeOutput]
    finished: bool = False


@dataclass
class FakeEngineStream:
    """Stands in for AsyncLLM.generate(): yields RequestOutputs and records whether it was closed."""

    items: list[FakeRequestOutput]
    closed: bool = field(default=False)

    async def gen(self) -> AsyncGenerator[Any, None]:
        try:
            for item in self.items:
                yield item
        finally:
            self.closed = True


async def test_tracked_counts_tokens_and_closes_finished_requests() -> None:
    src = FakeEngineStream(
        [
            FakeRequestOutput([FakeOutput([1]), FakeOutput([2, 3])]),
            FakeRequestOutput([FakeOutput([4])], finished=True),
        ]
    )
    tracker = Tracker()
    seen = [out async for out in tracked(src.gen(), tracker, "r1")]
    assert len(seen) == 2
    assert tracker.tokens == 4
    assert tracker.open_ids == set()
    assert src.closed


async def test_tracked_closing_early_closes_the_engine_stream_and_keeps_the_request_open() -> None:
    src = FakeEngineStream([FakeRequestOutput([FakeOutput([1])]), FakeRequestOutput([FakeOutput([2])])])
    tracker = Tracker()
    stream = tracked(src.gen(), tracker, "r1")
    await stream.__anext__()
    await stream.aclose()
    assert src.closed  # AsyncLLM.generate aborts the request when closed
    assert tracker.open_ids == {"r1"}  # the engine wrapper aborts these too
    assert tracker.tokens == 1


@pytest.mark.parametrize(
    ("gib", "env", "kwargs"),
    [
        (None, "keep", {}),
        (1, "1", {"kv_cache_memory_bytes": 1 << 30}),
        (2.0, "2", {"kv_cache_memory_bytes": 2 << 30}),
        (0.5, None, {"kv_cache_memory_bytes": 1 << 29}),
    ],
)
def test_apply_kv_cache_space(
    monkeypatch: pytest.MonkeyPatch, gib: float | None, env: str | None, kwargs: dict[str, int]
) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "keep")
    assert apply_kv_cache_space(gib) == kwargs
    assert os.environ.get("VLLM_CPU_KVCACHE_SPACE") == env


# ------------------------------------------------------------------ the substring fast path vs the parse
def reference_chunk(wants_usage: bool, attributed: int, text: str, generated: int) -> tuple[int, Any, bool, int]:
    """The json-parse-every-event reading (the pre-fast-path implementation): the oracle."""
    tokens, usage, usage_only = 0, None, False
    for event in [e for e in text.split("\n\n") if e.strip()]:
        if event.strip() == "data: [DONE]":
            continue
        payload = parse_event(event)
        if payload is None or "error" in payload:
            continue
        choices = payload.get("choices") or []
        if not choices and isinstance(payload.get("usage"), dict):
            usage, usage_only = payload["usage"], not wants_usage
        elif any(isinstance(c, dict) and carries_output(c) for c in choices):
            tokens += max(0, generated - attributed)
            attributed = max(attributed, generated)
    return tokens, usage, usage_only, attributed


def compact(payload: dict[str, Any]) -> str:
    """An event rendered as vLLM renders it (pydantic model_dump_json: no spaces)."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


_HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def chat(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
    return {**_HEAD, "choices": [choice]}


def text(t: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": t, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    return {"id": "cmpl-1", "created": 1, "model": "m", "choices": [choice]}


PAYLOADS = [
    chat({"role": "assistant", "content": ""}),
    chat({"content": " Paris"}),
    chat({"content": ""}),  # a token held back by the detokenizer (no text yet)
    chat({"content": '"'}),  # a quote: escaped, still output
    chat({"content": "\\"}),
    chat({"content": 'say "content":"" and "finish_reason":"stop"'}),  # look-alikes inside the text
    chat({"content": '"usage":{} "error": x'}),
    chat({"content": ""}, "stop"),
    chat({}, "length"),
    chat({"reasoning": "hmm"}),
    chat({"reasoning_content": "hmm", "content": None}),
    chat({"tool_calls": [{"index": 0, "function": {"arguments": '{"text":"x"}'}}]}),
    chat({"content": "x"}, logprobs={"content": [{"token": "x", "logprob": -0.1, "top_logprobs": []}]}),
    chat({"content": ""}, logprobs={"content": [{"token": "content", "logprob": -0.1}]}),
    text(" Paris"),
    text(""),
    text("", "stop"),
    text('"'),
    {**_HEAD, "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 5, "completion_tokens": 2}},
    {**chat({"content": "x"}), "usage": {"prompt_tokens": 3, "total_tokens": 4, "completion_tokens": 1}},
    {"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
    {"error": {"message": '"content":"x" "finish_reason":"stop"', "type": "BadRequestError", "code": 400}},
]


@pytest.mark.parametrize("render", [compact, ev], ids=["compact", "spaced"])
@pytest.mark.parametrize("wants_usage", [False, True])
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize(("attributed", "generated"), [(0, 0), (0, 1), (2, 5), (5, 5)])
def test_fast_path_matches_the_parsing_reference(
    render: Any, wants_usage: bool, payload: dict[str, Any], attributed: int, generated: int
) -> None:
    piece = render(payload)
    acc = StreamAccounting(wants_usage)
    acc._attributed = attributed
    chunk = acc.chunk(piece, generated)
    want_tokens, want_usage, want_usage_only, want_attributed = reference_chunk(
        wants_usage, attributed, piece, generated
    )
    assert chunk is not None and chunk.data == piece
    assert (chunk.tokens, chunk.usage, chunk.usage_only) == (want_tokens, want_usage, want_usage_only)
    assert acc._attributed == want_attributed


def test_fast_path_multi_event_pieces_match_the_reference() -> None:
    events = [compact(p) for p in PAYLOADS] + [DONE, ": keep-alive\n\n"]
    for size in (2, 3, 5):
        acc = StreamAccounting(False)
        attributed = 0
        for i in range(0, len(events), size):
            piece = "".join(events[i : i + size])
            chunk = acc.chunk(piece, i + 1)
            tokens, usage, usage_only, attributed = reference_chunk(False, attributed, piece, i + 1)
            kept = "".join(e for e in events[i : i + size] if e != DONE)
            assert chunk is not None and chunk.data == kept
            assert (chunk.tokens, chunk.usage, chunk.usage_only) == (tokens, usage, usage_only)
