"""Constants and helpers of the Gemini adapter tests (fixtures live in tests/unit/gemini_fixtures.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.config import GeminiConfig
from serve_app.gemini import GeminiBackend
from serve_app.protocol import ChunkReply, Reply
from serve_app.testing.gemini_standin import StandIn

KEY = "sk-standin-SECRET-7c1f93ab"
KEY_ENV = "SERVE_APP_TEST_GEMINI_KEY"
MODEL = "gemini-test-flash"

CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "Blue"},
        {"role": "developer", "content": "Answer in English."},
        {"role": "user", "content": [{"type": "text", "text": "another"}, {"type": "text", "text": "one please"}]},
    ],
}


def make_backend(stand: StandIn, monkeypatch: pytest.MonkeyPatch, **cfg: Any) -> GeminiBackend:
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("GEMINI_BASE_URL", raising=False)
    return GeminiBackend(GeminiConfig(**{"api_key_env": KEY_ENV, "base_url": stand.base_url, "timeout_s": 5.0, **cfg}))


async def collect(gen: AsyncIterator[Reply]) -> list[Reply]:
    return [item async for item in gen]


def events(items: list[Reply]) -> list[dict[str, Any]]:
    """The JSON payloads of stream items; each must be exactly one SSE event without [DONE]."""
    out = []
    for item in items:
        if not isinstance(item, ChunkReply):
            raise AssertionError(f"expected a ChunkReply, got {item!r}")
        data = item.data
        if not (data.startswith("data: ") and data.endswith("\n\n") and data.count("data: ") == 1):
            raise AssertionError(f"not one SSE event: {data!r}")
        if "[DONE]" in data:
            raise AssertionError("[DONE] is the gateway's to write")
        out.append(json.loads(data[len("data: ") :]))
    return out
