"""Mid-stream failover to Gemini: the only replica dies mid-stream on a spill route.

With a Gemini model that accepts a trailing model turn (probed at start-up), the stream finishes on
Gemini with no error event; with a model that rejects it, the probe marks it not continuable and the
stream ends with one error event, as before.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.testing.gemini_standin import StandIn, running_standin
from tests.integration.chaos_support import admin, errors, ids, kill, replica_stats, stream, text
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, deploy
from tests.support import sim_pool, wait_for

APP = "fogem"
GOOD, OLD = "gemini-3.5-flash-lite", "old-gemini"
ROUTES = {"fo-good": GOOD, "fo-old": OLD}


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with running_standin(
        api_key=GEMINI_TEST_KEY, latency_ms=20, tokens_per_second=200, model_behaviours={OLD: "reject_continuation"}
    ) as s:
        yield s


@pytest.fixture(scope="module")
def base(ray_cluster: dict[str, Any], standin: StandIn) -> Iterator[str]:
    from ray import serve

    breaker = {"first_token_timeout_s": 3.0}
    config = {
        "pools": {
            "fo": sim_pool(
                simulated={"max_num_seqs": 8, "tokens_per_second": 10.0, "first_token_delay_s": 0.05},
                deployment={"num_replicas": 1},
            )
        },
        "routes": {
            alias: {"policy": "spill", "pool": "fo", "gemini_model": model, "breaker": breaker}
            for alias, model in ROUTES.items()
        },
        "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url, "timeout_s": 5},
        "gateway": {"num_cpus": 0.1, "stream_idle_timeout_s": 3.0},
    }
    url = deploy(ray_cluster, APP, config)
    root = url.removesuffix("/v1")
    wait_for(lambda: len(admin(root)["gemini_models"]) == 2, 60, what="both Gemini models probed")
    yield url
    serve.delete(APP)


def _kill_the_replica_mid_stream(base: str, alias: str) -> dict[str, Any]:
    wait_for(lambda: admin(base.removesuffix("/v1"))["pools"]["fo"]["ready_replicas"] == 1, 120, what="a replica")
    (victim,) = replica_stats(APP, "LLMServer-fo", 1).values()
    body = {"model": alias, "messages": [{"role": "user", "content": "go"}], "max_tokens": 40}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(stream, f"{base}/chat/completions", body, 120)
        time.sleep(1.5)  # about 15 words in
        kill(victim["pid"])
        return fut.result()


def test_the_probe_knows_which_model_can_continue(base: str) -> None:
    models = admin(base.removesuffix("/v1"))["gemini_models"]
    assert models[GOOD]["ok"] and models[GOOD]["continuable"] is True
    assert models[OLD]["ok"] and models[OLD]["continuable"] is False


def test_stream_finishes_on_gemini_when_no_replica_is_left(base: str) -> None:
    r = _kill_the_replica_mid_stream(base, "fo-good")
    assert r["status"] == 200 and not errors(r) and r["events"][-1] == "[DONE]"
    assert any("self_hosted->gemini" in c for c in r["comments"]) and len(ids(r)) == 1
    assert text(r).startswith("The quick brown")  # the self-hosted part, then Gemini's continuation


def test_a_model_that_rejects_a_trailing_model_turn_ends_with_one_error_event(base: str) -> None:
    r = _kill_the_replica_mid_stream(base, "fo-old")
    assert r["status"] == 200 and len(errors(r)) == 1 and r["events"][-1] == "[DONE]"
    assert not any("gemini" in c for c in r["comments"])
