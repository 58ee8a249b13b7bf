"""The Gemini stand-in server itself: HTTP controls, auth, request log, SSE framing, process mode."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator

import httpx
import pytest

from serve_app.testing.gemini_standin import StandIn, reply_candidates, running_standin
from tests.support import free_port

KEY = "sk-standin-SECRET-51d0e2"
KEY_ENV = "SERVE_APP_TEST_GEMINI_KEY"
MODEL = "gemini-test-flash"


@pytest.fixture
def stand() -> Iterator[StandIn]:
    with running_standin(api_key=KEY) as s:
        yield s


async def test_standin_http_controls_auth_and_request_log(stand: StandIn) -> None:
    async with httpx.AsyncClient(base_url=stand.base_url) as http:
        r = await http.post("/_control", json={"latency_ms": 5, "failure": "503"})
        assert r.status_code == 200 and r.json()["failure"] == "503" and stand.controls().latency_ms == 5
        assert (await http.post("/_control", json={"failure": "sometimes"})).status_code == 400
        url = f"/v1beta/models/{MODEL}:generateContent"
        r = await http.post(url, json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        r = await http.post(url, json={}, headers={"x-goog-api-key": "nope"})
        assert r.status_code == 403 and set(r.json()["error"]) == {"code", "message", "status"}
        r = await http.post(url, json={"contents": [{"parts": [{"text": "hi"}]}]}, headers={"x-goog-api-key": KEY})
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        log = (await http.get("/_requests")).json()["requests"]
        assert [(e["key_present"], e["key_matched"]) for e in log] == [(False, False), (True, False), (True, True)]
        assert (await http.delete("/_requests")).json() == {"requests": []}


async def test_standin_runs_as_a_process() -> None:

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "serve_app.testing.gemini_standin",
        "--port",
        str(port),
        "--api-key-env",
        KEY_ENV,
        "--latency-ms",
        "1",
        stdout=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", KEY_ENV: KEY},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert f"127.0.0.1:{port}" in line.decode()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/_control")).json()["latency_ms"] == 1
            r = await http.post(
                f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
                json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
                headers={"x-goog-api-key": KEY},
            )
        raw = r.text
        assert raw.startswith("data: ") and raw.endswith("\n\n") and "[DONE]" not in raw
        payloads = [json.loads(block[len("data: ") :]) for block in raw.strip().split("\n\n")]
        assert (
            "".join(p["candidates"][0]["content"]["parts"][0]["text"] for p in payloads) == "Gemini stand-in reply: hi"
        )
        assert payloads[-1]["candidates"][0]["finishReason"] == "STOP" and "usageMetadata" in payloads[-1]
        assert all("usageMetadata" not in p and "finishReason" not in p["candidates"][0] for p in payloads[:-1])
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


def _body(text: str, **gen: object) -> dict[str, object]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], "generationConfig": gen}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_body("a b"), [("Gemini stand-in reply: a b", "STOP")]),
        (_body("a b", maxOutputTokens=4), [("Gemini stand-in reply: a", "MAX_TOKENS")]),
        (_body("a b", maxOutputTokens=5), [("Gemini stand-in reply: a b", "STOP")]),
        (_body("x y z", stopSequences=[" z"]), [("Gemini stand-in reply: x y", "STOP")]),
        (_body("x y z", stopSequences=["z", "reply"], maxOutputTokens=1), [("Gemini", "MAX_TOKENS")]),
        (
            _body("hi", candidateCount=2),
            [("Gemini stand-in reply: hi", "STOP"), ("Gemini stand-in reply 2: hi", "STOP")],
        ),
    ],
)
def test_reply_is_deterministic_and_honours_generation_config(
    body: dict[str, object], expected: list[tuple[str, str]]
) -> None:
    assert [(c.text, c.finish) for c in reply_candidates(body)] == expected


async def test_latency_and_tokens_per_second_pace_the_stream(stand: StandIn) -> None:
    stand.set(latency_ms=200, tokens_per_second=20)
    url = f"{stand.base_url}/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"
    started = asyncio.get_running_loop().time()
    async with httpx.AsyncClient() as http:
        r = await http.post(url, json=_body("one two"), headers={"x-goog-api-key": KEY})
    elapsed = asyncio.get_running_loop().time() - started
    assert r.status_code == 200 and r.text.count("data: ") == 5
    assert elapsed >= 0.2 + 4 / 20 - 0.02  # latency, then 4 gaps between 5 events at 20 events/s
