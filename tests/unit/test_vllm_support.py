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
