"""Every PromQL query of configs/grafana/serve_app.json returns data from a real Prometheus.

A real Prometheus (start_prometheus, 1 s scrapes) scrapes the session cluster's metrics port. Traffic
goes out in two rounds, each waited for in Prometheus, so every counter has risen inside the rate window
(a series' first sample never counts as an increase). Then each panel query runs through /api/v1/query
with the template variables at All and `$__rate_interval` at a concrete window. A query about a metric
nobody exports returns nothing, so the test fails on it.

One documented exemption: event-only metrics (serve_app.metrics.EVENT_ONLY) have no series until their
event happened. This traffic causes no pool retry, no broken stream and no rejected config (the chaos
tests assert those metrics), so a query that reads only those metrics may come back empty; it must still
be accepted by Prometheus. The Gemini probe gauge is not exempt: this app has Gemini routes, probed
against the stand-in when the gateway starts.

The vLLM engine row needs the real engine (the session's `real_app`); it is a separate test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.metrics import EVENT_ONLY
from serve_app.ops.observe import PrometheusHandle, start_prometheus
from serve_app.testing.gemini_standin import running_standin
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy
from tests.observability import (
    Target,
    has_value,
    is_vllm,
    load_dashboard,
    metric_names,
    series_names,
    substitute,
    targets,
)
from tests.support import free_port, sim_pool, wait_for

APP = "obs-dash"
OK, SPILL, HOSTED = "obs-d", "obs-d-spill", "obs-d-gemini"
RETRY_S = 60.0  # how long failed scrapes (a loaded machine) may delay the check
WINDOW = "60s"  # >> the 1 s scrape interval and Ray's few-second export period; covers both rounds
STREAMS_PER_ROUND = 4  # two on the pool, one spilled, one hosted
REQUESTS_PER_ROUND = 6  # plus one unknown-model 404 (model "unknown", not ours)
TRIGGERED_HERE = frozenset({"gemini_model_up"})  # event-only, but this app's start-up causes it
NOT_TRIGGERED = EVENT_ONLY - TRIGGERED_HERE
NOT_TRIGGERED_SERIES = frozenset().union(*(series_names(key) for key in NOT_TRIGGERED))


def _chat(base: str, model: str, stream: bool, max_tokens: int = 4) -> int:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120) as r:
            r.read()
            return r.status_code
    return httpx.post(f"{base}/chat/completions", json=body, timeout=120).status_code


def _round(base: str) -> None:
    assert _chat(base, OK, stream=True) == 200
    assert _chat(base, OK, stream=True) == 200
    assert _chat(base, OK, stream=False) == 200
    assert _chat(base, OK, stream=False, max_tokens=-1) == 400  # an error outcome on a real route
    assert _chat(base, "no-such-model", stream=False) == 404
    assert _chat(base, SPILL, stream=True) == 200  # the pool fails before its first token: spill
    assert _chat(base, HOSTED, stream=True) == 200


def _scalar(prom: PrometheusHandle, expr: str) -> float:
    result = prom.query(expr)
    return float(result[0]["value"][1]) if result else -1.0


def _two_rounds(prom: PrometheusHandle, send: Callable[[], None], progress: str, per_round: float) -> None:
    """Send a round, wait until Prometheus has it, send another, wait again."""
    for n in (1, 2):
        send()
        wait_for(
            lambda n=n: _scalar(prom, progress) >= n * per_round,
            timeout=90,
            interval=1.0,
            what=f"round {n} in Prometheus ({progress} >= {n * per_round})",
        )


@pytest.fixture(scope="module")
def prometheus(ray_cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusHandle]:
    workdir: Path = tmp_path_factory.mktemp("prometheus")
    with start_prometheus(ray_cluster["metrics_port"], free_port(), workdir, interval_s=1.0) as prom:
        # Baselines taken before the first scrape would read as zero.
        wait_for(lambda: _scalar(prom, 'up{job="ray"}') == 1, timeout=30, what="the first scrape of Ray")
        yield prom


@pytest.fixture(scope="module")
def gateway_traffic(ray_cluster: dict[str, Any], prometheus: PrometheusHandle) -> Iterator[None]:
    from ray import serve

    with running_standin(api_key=GEMINI_TEST_KEY) as standin:
        config = {
            "pools": {"obsd": sim_pool(), "obsdf": sim_pool(simulated={"fail_before_first_token": True})},
            "routes": {
                OK: {"policy": "spill", "pool": "obsd", "gemini_model": "gemini-2.5-flash"},
                SPILL: {"policy": "spill", "pool": "obsdf", "gemini_model": "gemini-2.5-flash"},
                HOSTED: {"policy": "hosted_only", "gemini_model": "gemini-2.5-flash"},
            },
            "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url},
            "gateway": {"num_cpus": 0.1, "num_replicas": 1},
        }
        base = deploy(ray_cluster, APP, config)
        try:
            streams = f'sum(ray_serve_app_ttft_seconds_count{{model=~"{OK}.*"}})'
            requests = f'sum(ray_serve_app_requests_total{{model=~"{OK}.*"}})'
            _two_rounds(prometheus, lambda: _round(base), requests, REQUESTS_PER_ROUND)
            wait_for(lambda: _scalar(prometheus, streams) >= 2 * STREAMS_PER_ROUND, timeout=60, what="streams")
            probed = "count(ray_serve_app_gemini_model_up)"  # the start-up probe runs in the background
            wait_for(lambda: _scalar(prometheus, probed) >= 1, timeout=60, what="the Gemini probe gauge")
            yield
        finally:
            serve.delete(APP)


def _event_only(t: Target) -> bool:
    """Whether every metric the query reads is an event-only one this traffic does not cause."""
    return metric_names(t.expr) <= NOT_TRIGGERED_SERIES


def _failures(prom: PrometheusHandle, chosen: list[Target], dash: dict[str, Any]) -> list[str]:
    failures = []
    for t in chosen:
        expr = substitute(t.expr, dash, WINDOW)
        result = prom.query(expr)  # raises when Prometheus rejects the query, exempt or not
        if not has_value(result) and not _event_only(t):
            failures.append(f"{t.label}: {'NaN only' if result else 'no data'}\n    {expr}")
    return failures


def _check(prom: PrometheusHandle, vllm: bool) -> None:
    """Every chosen query returns a number, in one pass right after a successful scrape.

    On a loaded machine a scrape of Ray's port can exceed the 1 s timeout; Prometheus then marks every
    series of the target stale, and instant gauge queries come back empty until the next good scrape.
    That is the scrape, not the dashboard: such a pass is retried (for a bounded time) after a good one.
    """
    dash = load_dashboard()
    chosen = [t for t in targets(dash) if is_vllm(t.expr) == vllm]
    assert chosen
    deadline = time.monotonic() + RETRY_S
    while True:
        wait_for(lambda: _scalar(prom, 'up{job="ray"}') == 1, timeout=RETRY_S, what="a successful scrape of Ray")
        failures = _failures(prom, chosen, dash)
        scraped_ok = _scalar(prom, 'min_over_time(up{job="ray"}[10s])') == 1
        if not failures or scraped_ok or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    health = f"(scrapes of Ray in the last 10 s all succeeded: {scraped_ok})"
    assert not failures, f"{len(failures)} of {len(chosen)} queries returned no data {health}:\n" + "\n".join(failures)


def test_gateway_and_serve_panels_return_data(prometheus: PrometheusHandle, gateway_traffic: None) -> None:
    _check(prometheus, vllm=False)


def test_the_exemption_covers_only_event_only_panels() -> None:
    """Every exempt metric has a panel, and every panel query it exempts reads nothing else."""
    assert TRIGGERED_HERE <= EVENT_ONLY
    exempt = [t for t in targets(load_dashboard()) if _event_only(t)]
    read = set().union(*(metric_names(t.expr) for t in exempt))
    for key in NOT_TRIGGERED:
        assert read & series_names(key), f"no exempt panel query reads {key}"
    assert all(metric_names(t.expr) and not is_vllm(t.expr) for t in exempt)


def test_vllm_engine_panels_return_data(prometheus: PrometheusHandle, real_app: str) -> None:
    """vLLM's own metrics (through its Ray stat logger) exist only with the real engine."""
    alias = httpx.get(f"{real_app}/models", timeout=30).json()["data"][0]["id"]

    def send() -> None:
        assert _chat(real_app, alias, stream=True, max_tokens=8) == 200
        assert _chat(real_app, alias, stream=False, max_tokens=8) == 200

    before = max(0.0, _scalar(prometheus, "sum(ray_vllm_e2e_request_latency_seconds_count)"))
    _two_rounds(prometheus, send, f"sum(ray_vllm_e2e_request_latency_seconds_count) - {before}", 2)
    _check(prometheus, vllm=True)
