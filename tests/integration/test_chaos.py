"""Chaos on real Ray with the simulated engine failing the way vLLM fails (the double; see test_chaos_real).

For each fault: what the client sees, that nothing hangs past the deadline, that no 500 appears, and that
the breaker and gauges end where they should.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from serve_app.testing.gemini_standin import StandIn, running_standin
from tests.integration.chaos_support import (
    admin,
    board_pid,
    errors,
    ids,
    kill,
    replica_stats,
    settled,
    stream,
    text,
    usage,
)
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy_declarative
from tests.support import sim_pool, wait_for

APP = "chaos"
POOL = "cs"
DEPLOYMENT = f"LLMServer-{POOL}"
SPILL, SELF, HOSTED = "cs-spill", "cs-self", "cs-hosted"
GEM = "gemini-3.5-flash-lite"
WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "again.")
IDLE_S, FIRST_S = 2.0, 2.0


def reference(n: int) -> str:
    """The simulated engine's answer: the same word sequence for every request."""
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(n))


def config(standin: StandIn) -> dict[str, Any]:
    breaker = {"failure_threshold": 3, "open_s": 2.0, "half_open_probes": 1, "first_token_timeout_s": FIRST_S}
    return {
        "pools": {
            POOL: sim_pool(
                simulated={"max_num_seqs": 4, "tokens_per_second": 20.0, "first_token_delay_s": 0.05},
                deployment={"num_replicas": 2, "engine_stall_timeout_s": 3.0, "health_check_period_s": 1.0},
            )
        },
        "routes": {
            SPILL: {"policy": "spill", "pool": POOL, "gemini_model": GEM, "breaker": breaker},
            SELF: {"policy": "self_hosted_only", "pool": POOL, "breaker": breaker},
            HOSTED: {"policy": "hosted_only", "gemini_model": GEM},
        },
        "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url, "timeout_s": 3},
        "gateway": {
            "num_cpus": 0.1,
            "retry_after_s": 3,
            "stream_idle_timeout_s": IDLE_S,
            "request_timeout_s": 20,
            "max_continuations": 2,
        },
    }


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with running_standin(api_key=GEMINI_TEST_KEY, latency_ms=20, tokens_per_second=200) as s:
        yield s


@pytest.fixture(scope="module")
def base(ray_cluster: dict[str, Any], standin: StandIn) -> Iterator[str]:
    from ray import serve

    url = deploy_declarative(ray_cluster, APP, config(standin))
    wait_for(lambda: admin(root(url))["pools"][POOL]["ready_replicas"] == 2, 60, what="2 ready replicas")
    wait_for(lambda: GEM in admin(root(url))["gemini_models"], 30, what="the Gemini start-up probe")
    yield url
    serve.delete(APP)


def root(base: str) -> str:
    return base.removesuffix("/v1")


def chat(model: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": max_tokens, **extra}


def all_replicas(**faults: Any) -> set[str]:
    """Set faults on every running replica (calls go to random replicas: repeat until both answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)
    reached: set[str] = set()
    deadline = time.monotonic() + 30
    while len(reached) < 2:
        assert time.monotonic() < deadline, f"reached only {reached}"
        reached.add(handle.set_faults.remote(**faults).result(timeout_s=10))
    return reached


def healthy_again(base: str) -> None:
    all_replicas(fail_before_first_token=False, fail_after_tokens=None, error_style="raise", hang=False)


def breaker(base: str) -> str:
    state: str = admin(root(base))["pools"][POOL]["breaker"]
    return state


# ------------------------------------------------------------------------------------ client side
def test_client_aborts_never_open_the_breaker(base: str) -> None:
    for _ in range(10):
        r = stream(f"{base}/chat/completions", chat(SPILL, 40), abort_after=2)
        assert r["status"] == 200
    view = settled(root(base), POOL)
    assert view["pools"][POOL]["breaker"] == "closed"
    nxt = stream(f"{base}/chat/completions", chat(SPILL, 3))
    assert nxt["headers"]["x-served-by"] == "self-hosted" and not errors(nxt)


def test_one_request_id_end_to_end(base: str) -> None:
    r = httpx.post(f"{base}/chat/completions", json=chat(SELF, 2), headers={"X-Request-Id": "client-id-42"}, timeout=30)
    assert r.status_code == 200 and r.headers.get_list("x-request-id") == ["client-id-42"]
    mine = httpx.post(f"{base}/chat/completions", json=chat(SELF, 2), timeout=30)
    assert len(mine.headers.get_list("x-request-id")) == 1
    bad = httpx.post(f"{base}/chat/completions", json={"model": "nope"}, headers={"X-Request-Id": "e-1"}, timeout=30)
    assert bad.status_code == 400 and bad.headers.get_list("x-request-id") == ["e-1"]


# ------------------------------------------------------------------------------------ engine faults
def test_inband_error_before_output_is_retried_spilled_or_503(base: str) -> None:
    """vLLM reports an engine failure as an error event inside a 200 stream: before output that is a
    failure before the first byte: spill (spill route) or 503 + Retry-After (self-hosted only), never 200."""
    all_replicas(fail_before_first_token=True, error_style="event")
    try:
        spilled = stream(f"{base}/chat/completions", chat(SPILL, 3))
        assert spilled["status"] == 200 and spilled["headers"]["x-served-by"] == "gemini"
        assert spilled["headers"]["x-spill-reason"] == "error_before_first_token" and not errors(spilled)
        refused = stream(f"{base}/chat/completions", chat(SELF, 3))
        assert refused["status"] == 503 and int(refused["headers"]["retry-after"]) > 0
        assert refused["body"]["error"]["type"] == "service_unavailable"
    finally:
        healthy_again(base)
    settled(root(base), POOL)


def test_mid_stream_error_event_is_continued_exactly(base: str) -> None:
    """Every attempt dies after 5 tokens (error event in the stream): the answer is stitched from three
    attempts with no duplicated and no missing text, one id, one usage for the whole answer."""
    all_replicas(fail_after_tokens=5, error_style="event")
    try:
        r = stream(f"{base}/chat/completions", chat(SELF, 12, stream_options={"include_usage": True}))
    finally:
        healthy_again(base)
    assert r["status"] == 200 and not errors(r) and r["events"][-1] == "[DONE]"
    assert text(r) == reference(12)
    assert len(ids(r)) == 1
    u = usage(r)
    assert u is not None and u["completion_tokens"] == 12
    assert len(r["comments"]) == 2  # the failover marker: an SSE comment, invisible to OpenAI clients


@pytest.mark.parametrize("kind", ["logprobs", "tools", "json_schema"])
def test_unfaithful_continuations_are_refused(base: str, kind: str) -> None:
    """A continuation could not reproduce these faithfully: the stream ends with one error event.
    (n > 1 is refused the same way — see the unit table; the double serves n=1 only.)"""
    extra: dict[str, Any] = {
        "logprobs": {"logprobs": True},
        "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
    }[kind]
    all_replicas(fail_after_tokens=3, error_style="event")
    try:
        r = stream(f"{base}/chat/completions", chat(SELF, 8, **extra))
    finally:
        healthy_again(base)
    assert r["status"] == 200 and len(errors(r)) == 1 and r["events"][-1] == "[DONE]"
    assert not r["comments"]


def test_hung_engines_continue_on_gemini_and_are_replaced(base: str, standin: StandIn) -> None:
    """Both engines stop making progress mid-stream (a SIGSTOPped EngineCore): the idle timeout fires, no
    replica can continue, so the answer continues on Gemini; the stalled replicas fail their health check."""
    before = set(replica_stats(APP, DEPLOYMENT, 2))
    standin.clear_requests()
    from ray import serve

    handle = serve.get_deployment_handle(DEPLOYMENT, app_name=APP)

    def hang_soon() -> None:
        time.sleep(0.6)
        all_replicas(hang=True)

    import threading

    t = threading.Thread(target=hang_soon)
    t.start()
    started = time.monotonic()
    r = stream(f"{base}/chat/completions", chat(SPILL, 60))
    t.join()
    assert time.monotonic() - started < IDLE_S + 3 * FIRST_S + 10  # never hangs past the deadlines
    assert r["status"] == 200 and not errors(r) and r["events"][-1] == "[DONE]"
    produced = text(r)
    assert produced.startswith("The quick") and any("gemini" in c for c in r["comments"])
    assert len(ids(r)) == 1
    # The replica that served the stream stalled with work in it: its health check fails and Serve
    # replaces it. (The other one is un-hung below if it saw no request while hung.)
    wait_for(lambda: set(replica_stats(APP, DEPLOYMENT, 2)) != before, 120, what="a stalled replica replaced")
    all_replicas(hang=False)
    del handle
    wait_for(lambda: breaker(base) == "closed" or _probe_closes(base), 30, what="breaker closed again")
    settled(root(base), POOL)


def _probe_closes(base: str) -> bool:
    stream(f"{base}/chat/completions", chat(SPILL, 2))
    return breaker(base) == "closed"


def test_dead_engine_answers_503_fast_and_is_replaced(base: str) -> None:
    before = set(replica_stats(APP, DEPLOYMENT, 2))
    all_replicas(engine_dead=True)
    started = time.monotonic()
    r = httpx.post(f"{base}/chat/completions", json=chat(SELF, 3), timeout=30)
    assert r.status_code in (200, 503) and time.monotonic() - started < 10
    if r.status_code == 503:
        assert int(r.headers["retry-after"]) > 0
    # The dead replicas exit (their held calls turn into actor deaths) and Serve starts new ones within
    # seconds: a spill-route request is answered either by Gemini or by a fresh replica, never an error.
    spilled = httpx.post(f"{base}/chat/completions", json=chat(SPILL, 3), timeout=30)
    assert spilled.status_code == 200 and spilled.headers["x-served-by"] in ("gemini", "self-hosted")
    wait_for(lambda: not (set(replica_stats(APP, DEPLOYMENT, 2)) & before), 120, what="dead replicas replaced")
    ok = httpx.post(f"{base}/chat/completions", json=chat(SELF, 3), timeout=30)
    assert ok.status_code == 200 and ok.headers["x-served-by"] == "self-hosted"
    wait_for(lambda: breaker(base) == "closed" or _probe_closes(base), 30, what="breaker closed again")


# ------------------------------------------------------------------------------------ control plane
def test_loadboard_stopped_fails_closed_then_recovers(base: str) -> None:
    pid = board_pid(APP)
    kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: admin(root(base))["pools"][POOL]["saturated"], 15, what="stale load: fail closed")
        spilled = httpx.post(f"{base}/chat/completions", json=chat(SPILL, 2), timeout=30)
        assert spilled.status_code == 200 and spilled.headers["x-served-by"] == "gemini"
        assert spilled.headers["x-spill-reason"] == "saturated"
        own = httpx.post(f"{base}/chat/completions", json=chat(SELF, 2), timeout=30)
        assert own.status_code == 200 and own.headers["x-served-by"] == "self-hosted"
    finally:
        kill(pid, signal.SIGCONT)
    wait_for(lambda: not admin(root(base))["pools"][POOL]["saturated"], 15, what="fresh load again")
    kill(board_pid(APP))  # SIGKILL: Ray restarts the board; replicas repopulate it
    wait_for(
        lambda: admin(root(base))["pools"][POOL]["ready_replicas"] == 2, 60, what="board restarted and repopulated"
    )
    r = httpx.post(f"{base}/chat/completions", json=chat(SPILL, 2), timeout=30)
    assert r.headers["x-served-by"] == "self-hosted"


def test_live_config_typo_keeps_the_previous_table(ray_cluster: dict[str, Any], base: str, standin: StandIn) -> None:
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import serve_config
    from serve_app.config import parse_config

    doc = serve_config(parse_config(config(standin), "test"), APP, f"/{APP}")
    (gateway,) = [d for d in doc["applications"][0]["deployments"] if d["name"] == "Gateway"]
    gateway["user_config"]["routes"][SPILL]["policy"] = "spil"  # the typo
    gateway["user_config"]["routes"]["new-alias"] = {"policy": "self_hosted_only", "pool": POOL}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc))
    wait_for(lambda: admin(root(base))["config_error"], 60, what="the rejected config to be reported")
    assert "spil" in admin(root(base))["config_error"]
    r = httpx.post(f"{base}/chat/completions", json=chat(SPILL, 2), timeout=30)
    assert r.status_code == 200  # the old table still serves
    gone = httpx.post(f"{base}/chat/completions", json=chat("new-alias", 2), timeout=30)
    assert gone.status_code == 404  # and nothing of the bad config was applied
    fixed = serve_config(parse_config(config(standin), "test"), APP, f"/{APP}")
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(fixed))
    wait_for(lambda: admin(root(base))["config_error"] is None, 60, what="the good config applied")


# ------------------------------------------------------------------------------------ Gemini faults
def test_gemini_faults_are_429_503_or_one_error_event(base: str, standin: StandIn) -> None:
    try:
        standin.set(failure="429", retry_delay_s=7)
        r = httpx.post(f"{base}/chat/completions", json=chat(HOSTED, 2), timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        standin.set(failure="503", retry_delay_s=None)
        r = httpx.post(f"{base}/chat/completions", json=chat(HOSTED, 2), timeout=30)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        standin.set(failure="hang")
        started = time.monotonic()
        r = httpx.post(f"{base}/chat/completions", json=chat(HOSTED, 2), timeout=30)
        assert r.status_code == 503 and time.monotonic() - started < 10 and "retry-after" in r.headers
        standin.set(failure="cut_stream", fail_after_events=1)
        cut = stream(f"{base}/chat/completions", chat(HOSTED, 20))
        assert cut["status"] == 200 and len(errors(cut)) == 1 and cut["events"][-1] == "[DONE]"
    finally:
        standin.set(failure="none", retry_delay_s=None)
    settled(root(base), POOL)


def test_readiness_follows_the_pools(base: str) -> None:
    ready = httpx.get(f"{root(base)}/health/ready", timeout=10)
    assert ready.status_code == 200
    assert httpx.get(f"{root(base)}/health", timeout=10).status_code == 200


def test_request_log_line_reaches_the_gateway_replica_log(base: str) -> None:
    """The per-request JSON line is written at INFO in the running app, without prompt text."""
    import glob
    import json
    import os

    import ray

    secret = "purple-elephant-prompt"
    body = {"model": SELF, "messages": [{"role": "user", "content": secret}], "max_tokens": 2}
    r = httpx.post(f"{base}/chat/completions", json=body, headers={"X-Request-Id": "log-probe-77"}, timeout=30)
    assert r.status_code == 200
    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")

    def line() -> dict[str, Any] | None:
        for path in glob.glob(os.path.join(logs, f"replica_{APP}_Gateway_*.log")):
            with open(path, encoding="utf-8", errors="replace") as f:
                for raw in f:
                    if '"request_id":"log-probe-77"' in raw and "{" in raw:
                        found: dict[str, Any] = json.loads(raw[raw.index("{") :])
                        assert secret not in raw
                        return found
        return None

    entry = wait_for(line, 20, what="the request log line in the gateway replica's log")
    assert entry["outcome"] == "ok" and entry["route"] == "self_hosted" and entry["completion_tokens"] == 2


def test_loadboard_calls_do_not_grow_ray_gcs(ray_cluster: dict[str, Any]) -> None:
    """The board takes several calls a second for the app's life; with Ray's task events on, the GCS kept a
    ~3 KB record per call and grew ~100 MB an hour in the soak. 20,000 calls must not move it."""
    import psutil
    import ray

    from serve_app.loadboard import get_board

    session = ray._private.worker._global_node.get_session_dir_path()

    def gcs_rss_mb() -> float:
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "gcs_server" in cmd and session in cmd:
                return float(p.memory_info().rss) / 2**20
        raise AssertionError("no gcs_server for this session")

    board = get_board("gcs-probe")
    ray.get(board.pid.remote())
    before = gcs_rss_mb()
    for i in range(20_000):
        board.report.remote("p", "r", {"waiting": 1.0}, "")
        if i % 2000 == 0:
            ray.get(board.snapshot.remote())
    ray.get(board.snapshot.remote())
    time.sleep(5)  # task events are flushed to the GCS periodically
    assert gcs_rss_mb() - before < 15  # with task events on: ~+68 MB
    ray.kill(board)
