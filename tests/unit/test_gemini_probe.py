"""GeminiBackend.probe / probe_continuation against the stand-in: what the gateway learns at start-up."""

from __future__ import annotations

import time

import pytest

from serve_app.config import GeminiConfig
from serve_app.gemini import GeminiBackend, ModelProbe
from serve_app.testing.gemini_standin import StandIn
from tests.unit.gemini_helpers import KEY_ENV, MODEL, make_backend

pytest_plugins = ["tests.unit.gemini_fixtures"]
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_good_model_is_ok_and_continuable(backend: GeminiBackend, stand: StandIn) -> None:
    before = time.time()
    probe = await backend.probe(MODEL)
    assert probe == ModelProbe(MODEL, True, 200, "ok", True, probe.checked_at)
    assert before <= probe.checked_at <= time.time()
    first, second = stand.requests()  # the 1-token call, then the continuation check
    assert first["action"] == second["action"] == "generateContent"
    cfg = first["body"]["generationConfig"]
    assert cfg["maxOutputTokens"] == 1 and cfg["thinkingConfig"] == {"thinking_budget": 0}  # spill's budget
    assert [c["role"] for c in first["body"]["contents"]] == ["user"]
    assert [c["role"] for c in second["body"]["contents"]] == ["user", "model"]


async def test_unknown_model_fails_with_404(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(model_behaviours={"gemini-gone": "not_found"})
    probe = await backend.probe("gemini-gone")
    assert (probe.ok, probe.status, probe.continuable) == (False, 404, None)
    assert "404" in probe.message and "gemini-gone" in probe.message
    assert len(stand.requests()) == 1  # no continuation check on a model that is not there


async def test_rate_limited_model_fails_with_429(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(model_behaviours={"gemini-busy": "429"}, retry_delay_s=3)
    probe = await backend.probe("gemini-busy")
    assert (probe.ok, probe.status, probe.continuable) == (False, 429, None)
    assert "RESOURCE_EXHAUSTED" in probe.message
    assert (await backend.probe(MODEL)).ok  # per model: the others still answer


async def test_model_rejecting_a_trailing_model_turn_is_ok_but_not_continuable(
    backend: GeminiBackend, stand: StandIn
) -> None:
    stand.set(model_behaviours={"gemini-strict": "reject_continuation"})
    probe = await backend.probe("gemini-strict")
    assert (probe.ok, probe.status, probe.continuable) == (True, 200, False)
    assert await backend.probe_continuation("gemini-strict") is False
    assert await backend.probe_continuation(MODEL) is True


async def test_hanging_model_times_out_quickly_without_raising(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(model_behaviours={"gemini-stuck": "hang"})
    started = time.monotonic()
    try:
        probe = await backend.probe("gemini-stuck", timeout_s=0.5)
        assert await backend.probe_continuation("gemini-stuck", timeout_s=0.5) is False
    finally:
        stand.set(model_behaviours={})
    assert (probe.ok, probe.status) == (False, None)
    assert time.monotonic() - started < 3.0


async def test_probe_never_raises_when_gemini_is_unusable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    b = GeminiBackend(GeminiConfig(api_key_env=KEY_ENV, base_url="http://127.0.0.1:9"))
    probe = await b.probe(MODEL)
    assert (probe.ok, probe.status, probe.message) == (False, None, "hosted model not configured")
    assert await b.probe_continuation(MODEL) is False
    await b.close()


async def test_probe_sends_the_thinking_budget_spills_use(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    # A route's budget differs from the global one: the probe sends the one it is given.
    b = make_backend(stand, monkeypatch, thinking_budget=None)
    try:
        await b.probe(MODEL, thinking_budget=128)
        await b.probe(MODEL)
    finally:
        await b.close()
    sent = [r["body"]["generationConfig"].get("thinkingConfig") for r in stand.requests()]
    assert sent == [{"thinking_budget": 128}, {"thinking_budget": 128}, None, None]


async def test_probe_result_reads_as_a_plain_dict(backend: GeminiBackend, stand: StandIn) -> None:
    # The gateway exports it as-is (/admin/pools): vars() must work and be JSON-friendly.
    probe = await backend.probe(MODEL)
    assert vars(probe) == {
        "model": MODEL,
        "ok": True,
        "status": 200,
        "message": "ok",
        "continuable": True,
        "checked_at": probe.checked_at,
    }
