"""GeminiBackend error mapping, timeouts and secrecy, through the real SDK against the stand-in."""

from __future__ import annotations

import json
import logging
import time

import pytest

from serve_app import errors
from serve_app.config import GeminiConfig
from serve_app.gemini import GeminiBackend
from serve_app.testing.gemini_standin import StandIn
from tests.support import free_port
from tests.unit.gemini_helpers import CHAT, KEY, KEY_ENV, MODEL, collect, events, make_backend

pytest_plugins = ["tests.unit.gemini_fixtures"]
pytestmark = pytest.mark.asyncio(loop_scope="module")


# ------------------------------------------------------------------------------------ errors
async def test_429_is_rate_limited_with_configured_retry_after(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    stand.set(failure="429")
    b = make_backend(stand, monkeypatch, retry_after_s=11)
    try:
        for body in ({**CHAT}, {**CHAT, "stream": True}):
            with pytest.raises(errors.RateLimited) as info:
                await b.chat(body, "a", "r").__anext__()
            assert info.value.headers == {"Retry-After": "11"}
        assert len(stand.requests()) == 2  # connect_retries=0: no SDK retry
    finally:
        await b.close()


async def test_429_uses_the_upstream_retry_delay(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(failure="429", retry_delay_s=16.2)
    with pytest.raises(errors.RateLimited) as info:
        await backend.chat({**CHAT, "stream": True}, "a", "r").__anext__()
    assert info.value.headers["Retry-After"] == "17"


@pytest.mark.parametrize("failure", ["500", "503"])
async def test_5xx_is_service_unavailable(backend: GeminiBackend, stand: StandIn, failure: str) -> None:
    stand.set(failure=failure)
    with pytest.raises(errors.ServiceUnavailable, match=f"HTTP {failure}"):
        await backend.chat({**CHAT, "stream": True}, "a", "r").__anext__()


async def test_400_is_bad_request_with_geminis_message(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(failure="400")
    with pytest.raises(errors.BadRequest, match="generation_config: invalid"):
        await backend.completion({"model": MODEL, "prompt": "x"}, "a", "r").__anext__()


async def test_unknown_model_is_service_unavailable_naming_it(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(known_models=["gemini-other"])
    with pytest.raises(errors.ServiceUnavailable, match=MODEL):
        await backend.chat({**CHAT}, "a", "r").__anext__()


async def test_wrong_key_is_service_unavailable(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0000")
    b = GeminiBackend(GeminiConfig(api_key_env=KEY_ENV, base_url=stand.base_url, timeout_s=5.0))
    try:
        with pytest.raises(errors.ServiceUnavailable, match="credentials") as info:
            await b.chat({**CHAT}, "a", "r").__anext__()
    finally:
        await b.close()
    assert "sk-wrong-key-0000" not in str(info.value)
    assert stand.requests()[0]["key_present"] and not stand.requests()[0]["key_matched"]


async def test_hang_times_out_as_service_unavailable(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    stand.set(failure="hang")
    b = make_backend(stand, monkeypatch, timeout_s=0.5)
    started = time.monotonic()
    try:
        with pytest.raises(errors.ServiceUnavailable, match="did not answer"):
            await b.chat({**CHAT, "stream": True}, "a", "r").__anext__()
    finally:
        stand.set(failure="none")  # releases the hanging handler
        await b.close()
    assert time.monotonic() - started < 3.0


async def test_unreachable_upstream_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("GEMINI_BASE_URL", raising=False)
    b = GeminiBackend(GeminiConfig(api_key_env=KEY_ENV, base_url=f"http://127.0.0.1:{free_port()}", timeout_s=5.0))
    started = time.monotonic()
    try:
        with pytest.raises(errors.ServiceUnavailable, match="cannot reach"):
            await b.chat({**CHAT}, "a", "r").__anext__()
    finally:
        await b.close()
    assert time.monotonic() - started < 1.0  # no hidden SDK retry sleep


async def test_mid_stream_error_raises_after_the_first_chunks(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(failure="mid_stream_error", fail_after_events=2)
    gen = backend.chat({**CHAT, "stream": True}, "a", "r")
    got = [await gen.__anext__(), await gen.__anext__()]
    assert [e["choices"][0]["delta"].get("content") for e in events(got)] == ["Gemini", " stand-in"]
    with pytest.raises(errors.APIError) as info:
        await gen.__anext__()
    assert isinstance(info.value, errors.ServiceUnavailable)


async def test_unsupported_features_are_rejected_before_any_call(backend: GeminiBackend, stand: StandIn) -> None:
    with pytest.raises(errors.BadRequest) as info:
        backend.check_supported({**CHAT, "logprobs": True}, "chat")
    assert info.value.param == "logprobs"
    with pytest.raises(errors.BadRequest) as info:
        backend.check_supported({"model": MODEL, "prompt": "x", "echo": True}, "completion")
    assert info.value.param == "echo"
    with pytest.raises(errors.BadRequest):
        await backend.chat({**CHAT, "messages": []}, "a", "r").__anext__()
    assert stand.requests() == []


async def test_missing_key_means_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    b = GeminiBackend(GeminiConfig(api_key_env=KEY_ENV, base_url="http://127.0.0.1:9"))
    assert not b.available
    for gen in (b.chat({**CHAT}, "a", "r"), b.completion({"model": MODEL, "prompt": "x"}, "a", "r")):
        with pytest.raises(errors.ServiceUnavailable, match="hosted model not configured"):
            await gen.__anext__()
    await b.close()


async def test_key_never_appears_in_logs_or_errors(
    stand: StandIn, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    b = make_backend(stand, monkeypatch, timeout_s=0.5)
    messages: list[str] = [repr(b)]
    try:
        await collect(b.chat({**CHAT, "stream": True}, "a", "r"))
        await collect(b.chat({**CHAT}, "a", "r"))
        for failure in ("400", "429", "500", "503", "hang", "mid_stream_error"):
            stand.set(failure=failure)
            try:
                await collect(b.chat({**CHAT, "stream": True}, "a", "r"))
            except errors.APIError as err:
                messages += [str(err), json.dumps(err.body()), json.dumps(err.headers)]
            stand.set(failure="none")
    finally:
        await b.close()
    assert len(messages) == 1 + 6 * 3
    logged = [r.getMessage() + (r.exc_text or "") for r in caplog.records]
    assert any("Gemini call" in line for line in logged)  # the failures were logged ...
    assert not [line for line in logged + messages if KEY in line]  # ... without the key
    assert all(KEY not in json.dumps(r) for r in stand.requests())


async def test_upstream_messages_are_scrubbed_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from google.genai import errors as genai_errors

    monkeypatch.setenv(KEY_ENV, KEY)
    b = GeminiBackend(GeminiConfig(api_key_env=KEY_ENV, base_url="http://127.0.0.1:9"))
    upstream = genai_errors.ClientError(
        400, {"error": {"code": 400, "message": f"field value {KEY} is odd", "status": "INVALID_ARGUMENT"}}
    )
    mapped = b._map_error(upstream, MODEL)
    await b.close()
    assert isinstance(mapped, errors.BadRequest)
    assert KEY not in mapped.message and "[redacted]" in mapped.message
