"""Chaos on the REAL engine: two vLLM replicas (SmolLM2, float32 so greedy text is batch-independent).

- kill -9 of the replica serving streams: every stream ends with [DONE], no error event, and the text
  equals a reference run without a kill (continuation on the other replica);
- a request sent right after the kill on a self_hosted_only route is answered, not hung;
- kill -9 of a replica's EngineCore: the replica answers 503 fast (retried elsewhere), its streams
  continue, Serve replaces it;
- SIGSTOP of a replica's EngineCore: its streams continue after the idle timeout, the stall fails the
  health check, Serve replaces it;
- ten client aborts leave the breaker closed.
This module starts its own two-engine app (one module, one deployment) and deletes it at the end.
"""

from __future__ import annotations

import concurrent.futures
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve_app.testing.gemini_standin import StandIn, running_standin
from tests.integration.chaos_support import admin, alive, errors, kill, replica_stats, settled, stream, text
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy, real_config
from tests.support import wait_for

pytestmark = pytest.mark.real_engine

APP = "chaosreal"
POOL = "smollm2"
DEPLOYMENT = f"LLMServer-{POOL}"
SELF, SPILL = "r-self", "r-spill"
GEM = "gemini-3.5-flash-lite"
TOPICS = ("a lighthouse keeper", "a lost robot", "a mountain village", "a jazz pianist")
MAX_TOKENS = 96


def config(standin: StandIn) -> dict[str, Any]:
    cfg = real_config()
    pool = cfg["pools"][POOL]
    pool["vllm"].update(dtype="float32", cpu_kv_cache_space_gib=0.5, max_model_len=1024)
    pool["deployment"] = {
        **pool.get("deployment", {}),
        "num_replicas": 2,
        "health_check_period_s": 2.0,
        "engine_stall_timeout_s": 15.0,
    }
    breaker = {"first_token_timeout_s": 60.0, "failure_threshold": 5}
    cfg["routes"] = {
        SELF: {"policy": "self_hosted_only", "pool": POOL, "breaker": breaker},
        SPILL: {"policy": "spill", "pool": POOL, "gemini_model": GEM, "breaker": breaker},
    }
    cfg["gemini"] = {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url, "timeout_s": 10}
    cfg["gateway"] = {
        "num_cpus": 0.1,
        "stream_idle_timeout_s": 10.0,
        "request_timeout_s": 180.0,
        "pool_retries": 2,
        "max_continuations": 2,
    }
    return cfg


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with running_standin(api_key=GEMINI_TEST_KEY, latency_ms=20, tokens_per_second=200) as s:
        yield s


@pytest.fixture(scope="module")
def base(ray_cluster: dict[str, Any], standin: StandIn) -> Iterator[str]:
    from ray import serve

    url = deploy(ray_cluster, APP, config(standin))
    two_ready(url)
    yield url
    serve.delete(APP)


def root(base: str) -> str:
    return base.removesuffix("/v1")


def two_ready(base: str) -> dict[str, dict[str, Any]]:
    wait_for(lambda: admin(root(base))["pools"][POOL]["ready_replicas"] == 2, 300, 1.0, "two ready replicas")
    return replica_stats(APP, DEPLOYMENT, 2, timeout=300)


def story(topic: str, model: str = SELF) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }


def plain(topic: str, max_tokens: int) -> dict[str, Any]:
    """A non-streaming request (stream_options is only valid with stream)."""
    body = story(topic)
    del body["stream_options"]
    return {**body, "max_tokens": max_tokens}


def run_streams(base: str, during: Any = None) -> list[dict[str, Any]]:
    """The four greedy streams; `during` runs once every stream is well under way (client-side count, so
    a slow control call on a loaded machine can never let the streams finish before the fault)."""
    progress: list[list[int]] = [[] for _ in TOPICS]
    with concurrent.futures.ThreadPoolExecutor(len(TOPICS)) as pool:
        futures = [
            pool.submit(stream, f"{base}/chat/completions", story(t), 300, None, progress[i])
            for i, t in enumerate(TOPICS)
        ]
        if during is not None:
            wait_for(lambda: all(len(p) >= 8 for p in progress), 120, 0.05, "every stream under way")
            during()
            assert any(len(p) < MAX_TOKENS // 2 for p in progress), "the fault came too late to matter"
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def reference(base: str) -> list[str]:
    results = run_streams(base)
    assert all(r["status"] == 200 and not errors(r) for r in results)
    return [text(r) for r in results]


def busiest(base: str) -> dict[str, Any]:
    """The replica with the most requests inside its engine right now."""
    stats = replica_stats(APP, DEPLOYMENT, 2)
    return max(stats.values(), key=lambda s: s["active"])


def test_client_aborts_leave_the_breaker_closed(base: str) -> None:
    for i in range(10):
        r = stream(f"{base}/chat/completions", story(TOPICS[i % 4], SPILL), abort_after=2)
        assert r["status"] == 200
    view = settled(root(base), POOL)
    assert view["pools"][POOL]["breaker"] == "closed"


def test_kill_replica_mid_stream_continues_token_exact(base: str, reference: list[str]) -> None:
    before = two_ready(base)
    victim: dict[str, Any] = {}
    late: dict[str, Any] = {}

    def kill_busy_replica() -> None:
        time.sleep(random.uniform(0.0, 1.5))  # a random point mid-stream
        victim.update(busiest(base))
        kill(victim["pid"])
        # The request right after the kill, on a self_hosted_only route: answered, not hung.
        started = time.monotonic()
        r = httpx.post(f"{base}/chat/completions", json=plain(TOPICS[0], 4), timeout=200)
        late.update(status=r.status_code, seconds=time.monotonic() - started)

    results = run_streams(base, during=kill_busy_replica)
    assert victim["replica_id"] in before
    for r in results:
        assert r["status"] == 200 and not errors(r) and r["events"][-1] == "[DONE]", r["events"][-3:]
    continued = [i for i, r in enumerate(results) if r["comments"]]
    assert continued, "no stream was on the killed replica"
    assert [text(r) for r in results] == reference
    assert late["status"] == 200 and late["seconds"] < 120
    two_ready(base)  # Serve replaced the replica


def test_engine_core_killed_is_replaced_and_streams_continue(base: str, reference: list[str]) -> None:
    before = two_ready(base)
    victim: dict[str, Any] = {}

    def kill_engine() -> None:
        victim.update(busiest(base))
        for pid in victim["engine_pids"]:
            kill(pid)

    results = run_streams(base, during=kill_engine)
    assert all(r["status"] == 200 and not errors(r) and r["events"][-1] == "[DONE]" for r in results)
    assert [text(r) for r in results] == reference
    # Until Serve replaces it, the replica with a dead engine answers 503 fast and is not chosen.
    for _ in range(4):
        r = httpx.post(f"{base}/chat/completions", json=plain(TOPICS[1], 2), timeout=200)
        assert r.status_code == 200
    wait_for(lambda: victim["replica_id"] not in replica_stats(APP, DEPLOYMENT, 2), 300, 2, "replica replaced")
    assert set(two_ready(base)) != set(before)


def test_engine_core_stopped_streams_continue_and_replica_is_replaced(base: str, reference: list[str]) -> None:
    two_ready(base)
    victim: dict[str, Any] = {}

    def stop_engine() -> None:
        victim.update(busiest(base))
        for pid in victim["engine_pids"]:
            kill(pid, signal.SIGSTOP)

    try:
        started = time.monotonic()
        results = run_streams(base, during=stop_engine)
        assert time.monotonic() - started < 240
        assert all(r["status"] == 200 and not errors(r) and r["events"][-1] == "[DONE]" for r in results)
        assert [text(r) for r in results] == reference
        wait_for(lambda: victim["replica_id"] not in replica_stats(APP, DEPLOYMENT, 2), 300, 2, "replica replaced")
    finally:
        for pid in victim.get("engine_pids", []):  # never leave a stopped engine process behind
            if alive(pid):
                kill(pid, signal.SIGKILL)
    two_ready(base)
    settled(root(base), POOL)
