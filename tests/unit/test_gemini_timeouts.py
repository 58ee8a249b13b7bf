"""Issue 11 item 15, the Gemini parts: stream timing, cut streams and malformed RetryInfo, against the stand-in.

Each test failed on the adapter before the fix: a long stream was cut by the whole-call deadline, a stalled
stream waited for that deadline, a stream cut without finishReason ended as `stop`, and a huge RetryInfo
delay overflowed into a 500 (or a Retry-After of 10^21 s).
"""

from __future__ import annotations

import time

import pytest

from serve_app import errors
from serve_app.gemini import GeminiBackend
from serve_app.gemini_render import MAX_RETRY_AFTER_S
from serve_app.testing.gemini_standin import StandIn
from tests.unit.gemini_helpers import CHAT, collect, events, make_backend

pytest_plugins = ["tests.unit.gemini_fixtures"]
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_a_long_stream_outlives_the_call_timeout(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    # 6 events at 3/s take ~1.7 s: well past timeout_s, but no gap near the idle timeout.
    stand.set(tokens_per_second=3)
    b = make_backend(stand, monkeypatch, timeout_s=1.0, stream_idle_timeout_s=1.0)
    try:
        started = time.monotonic()
        items = await collect(b.chat({**CHAT, "stream": True}, "a", "r"))
        took = time.monotonic() - started
    finally:
        await b.close()
    assert took > 1.4
    chunks = events(items)
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == (
        "Gemini stand-in reply: another one please"
    )


async def test_a_stalled_stream_fails_after_the_idle_timeout(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    stand.set(tokens_per_second=0.5)  # 2 s between events
    b = make_backend(stand, monkeypatch, timeout_s=5.0, stream_idle_timeout_s=0.3)
    gen = b.chat({**CHAT, "stream": True}, "a", "r")
    try:
        first = await gen.__anext__()  # the first event comes at once
        assert events([first])[0]["choices"][0]["delta"]["content"] == "Gemini"
        started = time.monotonic()
        with pytest.raises(errors.ServiceUnavailable, match="stalled"):
            await gen.__anext__()
        assert time.monotonic() - started < 1.5
    finally:
        await gen.aclose()
        await b.close()


async def test_a_stream_cut_without_finish_reason_is_an_error(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(failure="cut_stream", fail_after_events=2)
    gen = backend.chat({**CHAT, "stream": True}, "a", "r")
    got = [await gen.__anext__(), await gen.__anext__()]
    assert [e["choices"][0]["delta"].get("content") for e in events(got)] == ["Gemini", " stand-in"]
    assert all(e["choices"][0]["finish_reason"] is None for e in events(got))
    with pytest.raises(errors.ServiceUnavailable, match="without a finish reason"):
        await gen.__anext__()
    assert stand.requests()[0]["stream_outcome"] == "cut"


@pytest.mark.parametrize(
    ("delay", "expected"),
    [("999999999999999999999s", str(MAX_RETRY_AFTER_S)), ("9" * 400 + "s", str(MAX_RETRY_AFTER_S)), ("0.2s", "1")],
)
async def test_malformed_retry_info_is_clamped(
    backend: GeminiBackend, stand: StandIn, delay: str, expected: str
) -> None:
    stand.set(failure="429", retry_delay_s=delay)
    for stream in (True, False):
        with pytest.raises(errors.RateLimited) as info:
            await backend.chat({**CHAT, "stream": stream}, "a", "r").__anext__()
        assert info.value.headers == {"Retry-After": expected}
