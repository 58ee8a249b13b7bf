"""Spill to Gemini on real Ray: simulated pool (capacity model) + the Gemini stand-in via the real SDK."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_app.testing.gemini_standin import StandIn, running_standin
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy
from tests.support import assert_not_in_ray_logs, sim_pool, wait_for

APP = "spill"
SPILL, HOSTED = "spilly", "gem"
OPEN_S = 2.0


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with running_standin(api_key=GEMINI_TEST_KEY, latency_ms=50, tokens_per_second=200) as s:
        yield s


@pytest.fixture(scope="module")
def base(ray_cluster: dict[str, Any], standin: StandIn) -> Iterator[str]:
    from ray import serve

    config = {
        "pools": {
            "sp": sim_pool(
                simulated={"max_num_seqs": 2, "tokens_per_second": 20.0, "first_token_delay_s": 0.05},
                deployment={"max_ongoing_requests": 4, "max_queued_requests": 4},
            )
        },
        "routes": {
            SPILL: {
                "policy": "spill",
                "pool": "sp",
                "gemini_model": "gemini-2.5-flash",
                "saturation": {"max_waiting_per_replica": 1, "max_inflight_per_replica": 2},
                "breaker": {"failure_threshold": 2, "open_s": OPEN_S, "half_open_probes": 1},
            },
            HOSTED: {"policy": "hosted_only", "gemini_model": "gemini-2.5-flash"},
        },
        "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url, "timeout_s": 10},
        "gateway": {"num_cpus": 0.1, "retry_after_s": 3},
    }
    yield deploy(ray_cluster, APP, config)
    serve.delete(APP)


def _pool(base: str) -> dict[str, Any]:
    view: dict[str, Any] = httpx.get(base.removesuffix("/v1") + "/admin/pools").json()["pools"]["sp"]
    return view


def _idle(base: str) -> None:
    wait_for(lambda: (p := _pool(base))["running"] == 0 and not p["saturated"], 15, what="idle, unsaturated pool")


def _stream(base: str, model: str, max_tokens: int = 20, **extra: Any) -> dict[str, Any]:
    body = {
        **extra,
        "model": model,
        "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    ttft = None
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=60) as r:
        events = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                if ttft is None:
                    ttft = time.monotonic() - started
                events.append(line.removeprefix("data: "))
        return {
            "status": r.status_code,
            "by": r.headers.get("x-served-by"),
            "reason": r.headers.get("x-spill-reason"),
            "ttft": ttft,
            "events": events,
            "headers": dict(r.headers),
        }


def _set_faults(**faults: Any) -> None:
    from ray import serve

    serve.get_deployment_handle("LLMServer-sp", app_name=APP).set_faults.remote(**faults).result(timeout_s=10)


def test_healthy_pool_spills_nothing(base: str) -> None:
    _idle(base)
    results = [_stream(base, SPILL, max_tokens=3) for _ in range(5)]
    assert [r["by"] for r in results] == ["self-hosted"] * 5, results[0]
    assert all(r["status"] == 200 for r in results)


def test_overload_spills_the_excess_and_fails_nothing(base: str, standin: StandIn) -> None:
    _idle(base)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: _stream(base, SPILL), range(16)))
    assert [r["status"] for r in results] == [200] * 16
    served = [r["by"] for r in results]
    assert 1 <= served.count("self-hosted") <= 6 and served.count("gemini") >= 10
    assert {r["reason"] for r in results if r["by"] == "gemini"} <= {"saturated", "backpressure"}
    ttfts = sorted(r["ttft"] for r in results)
    assert ttfts[-1] < 3.0  # bounded: nobody waited behind the 2-sequence pool
    for r in results:
        assert r["events"][-1] == "[DONE]" and r["events"].count("[DONE]") == 1
        last = ChatCompletionChunk.model_validate(json.loads(r["events"][-2]))
        assert last.usage is not None and last.usage.completion_tokens > 0


def test_traffic_returns_after_recovery(base: str) -> None:
    _idle(base)
    assert [_stream(base, SPILL, max_tokens=2)["by"] for _ in range(3)] == ["self-hosted"] * 3


def test_failing_replica_spills_then_breaker_opens_and_closes(base: str) -> None:
    _idle(base)
    _set_faults(fail_before_first_token=True)
    try:
        first = [_stream(base, SPILL, max_tokens=3) for _ in range(2)]
        assert [(r["status"], r["by"], r["reason"]) for r in first] == [(200, "gemini", "error_before_first_token")] * 2
        assert _pool(base)["breaker"] == "open"
        degraded = _stream(base, SPILL, max_tokens=3)
        assert (degraded["by"], degraded["reason"]) == ("gemini", "degraded")
    finally:
        _set_faults(fail_before_first_token=False)
    time.sleep(OPEN_S + 0.2)
    probe = _stream(base, SPILL, max_tokens=3)  # half-open: one probe goes to the pool and succeeds
    assert probe["by"] == "self-hosted"
    assert _pool(base)["breaker"] == "closed"


def test_error_after_first_byte_that_cannot_continue_is_one_sse_error_event(base: str) -> None:
    _idle(base)
    _set_faults(fail_after_tokens=3)
    try:  # logprobs: a continuation could not reproduce them, so the stream is not continued
        r = _stream(base, SPILL, max_tokens=10, logprobs=True)
    finally:
        _set_faults(fail_after_tokens=None)
    assert r["status"] == 200 and r["by"] == "self-hosted"
    errors = [e for e in r["events"] if e != "[DONE]" and "error" in json.loads(e)]
    assert len(errors) == 1 and r["events"][-1] == "[DONE]"


def test_error_after_first_byte_continues_and_finishes_on_gemini(base: str) -> None:
    _idle(base)
    _set_faults(fail_after_tokens=3)
    try:  # every pool attempt dies after 3 tokens: the answer is finished by the (continuable) stand-in
        r = _stream(base, SPILL, max_tokens=10)
    finally:
        _set_faults(fail_after_tokens=None)
    assert r["status"] == 200 and r["by"] == "self-hosted"
    assert not [e for e in r["events"] if e != "[DONE]" and "error" in json.loads(e)]
    assert r["events"][-1] == "[DONE]"
    # The pool failed every attempt it got: the breaker opened. Let it recover.
    time.sleep(OPEN_S + 0.2)
    assert _stream(base, SPILL, max_tokens=2)["by"] == "self-hosted"
    assert _pool(base)["breaker"] == "closed"


def test_saturated_pool_and_rate_limited_gemini_gives_429(base: str, standin: StandIn) -> None:
    _idle(base)
    standin.set(failure="429")
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(_stream, base, SPILL, 40) for _ in range(2)]  # fills the in-flight budget
            time.sleep(0.5)
            body = {"model": SPILL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
            r = httpx.post(f"{base}/chat/completions", json=body, timeout=30)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) > 0
            assert r.json()["error"]["type"] == "rate_limit_error"
            hosted = httpx.post(f"{base}/chat/completions", json={**body, "model": HOSTED}, timeout=30)
            assert hosted.status_code == 429 and "retry-after" in hosted.headers
            assert all(f.result()["status"] == 200 for f in busy)
    finally:
        standin.set(failure="none")


def test_gemini_down_gives_503_not_500(base: str, standin: StandIn) -> None:
    standin.set(failure="503")
    try:
        body = {"model": HOSTED, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        r = httpx.post(f"{base}/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and "retry-after" in r.headers and r.json()["error"]["message"]
    finally:
        standin.set(failure="none")


def test_hosted_path_has_the_same_openai_shapes(base: str) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    r = httpx.post(f"{base}/chat/completions", json={"model": HOSTED, "messages": msgs, "max_tokens": 5}, timeout=30)
    assert r.headers["x-served-by"] == "gemini" and r.headers["x-upstream-model"] == "gemini-2.5-flash"
    whole = ChatCompletion.model_validate(r.json())
    assert whole.model == HOSTED and whole.usage is not None and whole.usage.completion_tokens > 0
    streamed = _stream(base, HOSTED, max_tokens=5)
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in streamed["events"][:-1]]
    assert chunks[-1].usage is not None and all(c.model == HOSTED for c in chunks)
    comp = httpx.post(f"{base}/completions", json={"model": HOSTED, "prompt": "Once", "max_tokens": 3}, timeout=30)
    assert Completion.model_validate(comp.json()).choices[0].text


def test_unsupported_feature_is_never_silently_degraded(base: str) -> None:
    body = {"model": HOSTED, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "max_tokens": 2}
    r = httpx.post(f"{base}/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    # On a spill route the same request stays self-hosted instead.
    ok = httpx.post(f"{base}/chat/completions", json={**body, "model": SPILL}, timeout=30)
    assert ok.status_code == 200 and ok.headers["x-served-by"] == "self-hosted", ok.text


def test_gemini_key_never_leaks(base: str, ray_cluster: dict[str, Any]) -> None:
    r = httpx.post(f"{base}/chat/completions", json={"model": HOSTED, "messages": [{"role": "user", "content": "k"}]})
    assert GEMINI_TEST_KEY not in r.text and GEMINI_TEST_KEY not in json.dumps(dict(r.headers))
    assert_not_in_ray_logs(GEMINI_TEST_KEY)
