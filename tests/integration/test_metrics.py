"""The gateway's metrics as Ray's exporter serves them, after known traffic through the real deployments.

One app (simulated engines, the Gemini stand-in) gets a fixed mix of requests once; the tests then read
the session cluster's metrics port. Counts are exact; timings use a pool with a known first-token delay
and decode rate. Series are scoped to this app's gateway process (its WorkerId), because other test
modules share the cluster and also send unknown-model requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from serve_app.metrics import EVENT_ONLY, ITL_BUCKETS, SPECS, SPILL_REASONS, TTFT_BUCKETS
from serve_app.testing.gemini_standin import running_standin
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy
from tests.observability import Sample, scrape, select, series_names, total
from tests.support import sim_pool, wait_for

APP = "obs-metrics"
FAST, TIMED, SPILL, HOSTED = "obs-m", "obs-timed", "obs-spill", "obs-gemini"
N_STREAM, M_PLAIN, MAX_TOKENS = 3, 2, 5
K_TIMED, T_TIMED = 4, 20
FIRST_TOKEN_DELAY_S, TOKENS_PER_S = 1.05, 25.0  # TTFT in (1.0, 1.5]; ITL 0.04 s in (0.03, 0.05]
N_SPILL, G_STREAM, G_PLAIN = 2, 2, 1
PROMPT = "hello there"  # the simulated engine counts 2 words + 4 chat-template tokens
PROMPT_TOKENS = 6
GEMINI_MODEL = "gemini-2.5-flash"
# Event-only metrics (serve_app.metrics.EVENT_ONLY) this module's traffic does trigger: the app has Gemini
# routes, so each gateway replica probes GEMINI_MODEL against the stand-in when its Gemini settings are
# applied. The others (pool retries, failovers, rejected configs) need faults; the chaos tests assert them.
TRIGGERED_HERE = frozenset({"gemini_model_up"})


@dataclass
class Observed:
    samples: list[Sample]
    worker: str

    def get(self, name: str, **labels: str) -> list[Sample]:
        return select(self.samples, name, WorkerId=self.worker, **labels)

    def total(self, name: str, **labels: str) -> float:
        return total(self.samples, name, WorkerId=self.worker, **labels)

    def bucket(self, name: str, le: float, **labels: str) -> float:
        return self.total(name + "_bucket", le=str(float(le)), **labels)


def _chat(base: str, model: str, stream: bool, max_tokens: Any = MAX_TOKENS) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line]
            assert r.status_code != 200 or lines[-1] == "data: [DONE]", lines[-3:]
            return r.status_code
    return httpx.post(f"{base}/chat/completions", json=body, timeout=60).status_code


def _send_traffic(base: str) -> dict[str, int]:
    """The fixed request mix; returns how many requests the gateway should count in total."""
    statuses = [_chat(base, FAST, stream=True) for _ in range(N_STREAM)]
    statuses += [_chat(base, FAST, stream=False) for _ in range(M_PLAIN)]
    assert statuses == [200] * (N_STREAM + M_PLAIN)
    assert _chat(base, FAST, stream=False, max_tokens=-1) == 400  # judged by the engine: route self_hosted
    bad_json = httpx.post(f"{base}/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400  # rejected before routing: model "unknown", route "none"
    assert _chat(base, "no-such-model", stream=False) == 404
    with ThreadPoolExecutor(K_TIMED) as pool:
        timed = list(pool.map(lambda _: _chat(base, TIMED, stream=True, max_tokens=T_TIMED), range(K_TIMED)))
    assert timed == [200] * K_TIMED
    assert [_chat(base, SPILL, stream=True) for _ in range(N_SPILL)] == [200] * N_SPILL
    assert [_chat(base, HOSTED, stream=True) for _ in range(G_STREAM)] == [200] * G_STREAM
    assert [_chat(base, HOSTED, stream=False) for _ in range(G_PLAIN)] == [200] * G_PLAIN
    return {"sent": N_STREAM + M_PLAIN + 1 + 2 + K_TIMED + N_SPILL + G_STREAM + G_PLAIN}


@pytest.fixture(scope="module")
def observed(ray_cluster: dict[str, Any]) -> Iterator[Observed]:
    from ray import serve

    with running_standin(api_key=GEMINI_TEST_KEY) as standin:
        config = {
            "pools": {
                "obsm": sim_pool(),
                "obst": sim_pool(
                    simulated={"first_token_delay_s": FIRST_TOKEN_DELAY_S, "tokens_per_second": TOKENS_PER_S}
                ),
                "obsf": sim_pool(simulated={"fail_before_first_token": True}),
            },
            "routes": {
                FAST: {"policy": "self_hosted_only", "pool": "obsm"},
                TIMED: {"policy": "self_hosted_only", "pool": "obst"},
                SPILL: {"policy": "spill", "pool": "obsf", "gemini_model": GEMINI_MODEL},
                HOSTED: {"policy": "hosted_only", "gemini_model": GEMINI_MODEL},
            },
            "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url},
            "gateway": {"num_cpus": 0.1, "num_replicas": 1},
        }
        base = deploy(ray_cluster, APP, config)
        try:
            sent = _send_traffic(base)["sent"]

            def exported() -> Observed | None:
                samples = scrape(ray_cluster["metrics_port"])
                ours = select(samples, "ray_serve_app_requests_total", model=FAST)
                if not ours:
                    return None
                obs = Observed(samples, ours[0].labels["WorkerId"])
                mine = obs.total("ray_serve_app_requests_total")
                streams = obs.total("ray_serve_app_ttft_seconds_count")
                probed = bool(obs.get("ray_serve_app_gemini_model_up"))  # set by a background probe
                done = (mine, streams, probed) == (sent, N_STREAM + K_TIMED + N_SPILL + G_STREAM, True)
                return obs if done else None

            # Ray's metrics agent exports every few seconds.
            yield wait_for(exported, timeout=60, interval=1.0, what="the gateway's metrics on Ray's metrics port")
        finally:
            serve.delete(APP)


def test_every_metric_is_exported_with_its_labels(observed: Observed) -> None:
    """Every metric, except event-only ones whose event this traffic does not cause; those are checked for
    their labels only if some series of them exists."""
    assert TRIGGERED_HERE <= EVENT_ONLY <= set(SPECS)
    problems = []
    for key, spec in SPECS.items():
        series = [
            s for s in observed.samples if s.name in series_names(key) and s.labels["WorkerId"] == observed.worker
        ]
        if not series and key in EVENT_ONLY - TRIGGERED_HERE:
            continue
        if not series:
            problems.append(f"{spec.prometheus_name}: not exported")
            continue
        label_sets = {tuple(sorted(s.ours())) for s in series}
        if label_sets != {tuple(sorted(spec.tags))}:
            problems.append(f"{spec.prometheus_name}: labels {sorted(label_sets)}, expected {sorted(spec.tags)}")
    assert not problems, "\n".join(problems)


def test_requests_by_outcome(observed: Observed) -> None:
    counts = {
        (s.labels["model"], s.labels["route"], s.labels["outcome"]): s.value
        for s in observed.get("ray_serve_app_requests_total")
    }
    assert counts == {
        (FAST, "self_hosted", "ok"): N_STREAM + M_PLAIN,
        (FAST, "self_hosted", "client_error"): 1,
        ("unknown", "none", "client_error"): 2,  # malformed JSON (400) and an unknown model (404)
        (TIMED, "self_hosted", "ok"): K_TIMED,
        (SPILL, "gemini", "ok"): N_SPILL,
        (HOSTED, "gemini", "ok"): G_STREAM + G_PLAIN,
    }
    durations = observed.get("ray_serve_app_request_duration_seconds_count", model=FAST)
    assert {s.labels["outcome"]: s.value for s in durations} == {"ok": N_STREAM + M_PLAIN, "client_error": 1}


def test_ttft_counts_streaming_requests_only(observed: Observed) -> None:
    assert observed.total("ray_serve_app_ttft_seconds_count", model=FAST, route="self_hosted") == N_STREAM
    # One ITL observation per output chunk after the first: one per token, unless the replica merged tokens
    # that piled up (a fast engine on a busy machine); the timed pool below is slow enough to be exact.
    itl = observed.total("ray_serve_app_itl_seconds_count", model=FAST)
    assert 0 < itl <= N_STREAM * (MAX_TOKENS - 1)
    assert observed.total("ray_serve_app_ttft_seconds_count", model=SPILL, route="gemini") == N_SPILL
    assert observed.total("ray_serve_app_ttft_seconds_count", model=HOSTED, route="gemini") == G_STREAM
    assert observed.total("ray_serve_app_itl_seconds_count", model=HOSTED, route="gemini") > 0


def test_tokens_by_kind(observed: Observed) -> None:
    ok = N_STREAM + M_PLAIN
    assert observed.total("ray_serve_app_tokens_total", model=FAST, kind="completion") == ok * MAX_TOKENS
    assert observed.total("ray_serve_app_tokens_total", model=FAST, kind="prompt") == ok * PROMPT_TOKENS
    assert observed.total("ray_serve_app_tokens_total", model=TIMED, kind="completion") == K_TIMED * T_TIMED
    for model in (SPILL, HOSTED):
        for kind in ("prompt", "completion"):
            assert observed.total("ray_serve_app_tokens_total", model=model, route="gemini", kind=kind) > 0


def test_spill_by_reason(observed: Observed) -> None:
    reasons = {s.labels["reason"]: s.value for s in observed.get("ray_serve_app_spill_total", model=SPILL)}
    # Two failures stay under the breaker's threshold (5), so each spill is the failed first token.
    assert reasons == {"error_before_first_token": N_SPILL}
    assert set(reasons) <= set(SPILL_REASONS)
    assert not observed.get("ray_serve_app_spill_total", model=HOSTED)  # hosted_only is not a spill


def test_ttft_lands_in_the_first_token_delay_bucket(observed: Observed) -> None:
    name = "ray_serve_app_ttft_seconds"
    assert TTFT_BUCKETS.count(1.0) == 1 and TTFT_BUCKETS.count(1.5) == 1
    assert observed.bucket(name, 1.0, model=TIMED) == 0  # the engine sleeps 1.05 s before the first token
    assert observed.bucket(name, 1.5, model=TIMED) == K_TIMED  # and the path adds well under 0.45 s
    assert observed.total(name + "_count", model=TIMED) == K_TIMED


def test_itl_lands_in_the_decode_rate_bucket(observed: Observed) -> None:
    """25 tokens/s = 0.04 s per token: the median observation sits in the (0.03, 0.05] bucket."""
    name = "ray_serve_app_itl_seconds"
    assert 0.03 in ITL_BUCKETS and 0.05 in ITL_BUCKETS
    count = observed.total(name + "_count", model=TIMED)
    assert count == K_TIMED * (T_TIMED - 1)
    below, upto = observed.bucket(name, 0.03, model=TIMED), observed.bucket(name, 0.05, model=TIMED)
    assert below < count / 2 <= upto, (below, upto, count)
    # Scheduling jitter moves single gaps (one late chunk makes the next one early), but not many far.
    near = observed.bucket(name, 0.1, model=TIMED) - observed.bucket(name, 0.02, model=TIMED)
    assert near >= 0.8 * count, json.dumps({"near": near, "count": count})


def test_pool_gauges(observed: Observed) -> None:
    for pool in ("obsm", "obst", "obsf"):
        assert observed.total("ray_serve_app_pool_replicas", pool=pool) == 1
        assert observed.total("ray_serve_app_breaker_state", pool=pool) == 0  # closed
        assert observed.total("ray_serve_app_pool_saturated", pool=pool) == 0
        assert 0 <= observed.total("ray_serve_app_pool_kv_cache_usage", pool=pool) <= 1
        assert observed.total("ray_serve_app_pool_ready_replicas", pool=pool) == 1


def test_gemini_model_probe_passed(observed: Observed) -> None:
    """The stand-in answers the start-up probe, so the one configured Gemini model is up."""
    up = {s.labels["model"]: s.value for s in observed.get("ray_serve_app_gemini_model_up")}
    assert up == {GEMINI_MODEL: 1.0}
