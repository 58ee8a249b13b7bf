"""Drain: a rolling update with long streams in flight cuts none of them and never touches the breaker.

Serve stops routing to a stopping replica and waits for its ongoing requests up to
graceful_shutdown_timeout_s (300 s by default here, for both the engines and the gateway), so the six
80-second streams finish on the replicas that started them while new replicas take new requests.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

from tests.integration.chaos_support import admin, errors, replica_stats, stream
from tests.integration.conftest import deploy_declarative
from tests.support import sim_pool, wait_for

APP = "drain"
MODEL = "dr"
STREAM_S = 80


def config(first_token_delay_s: float) -> dict[str, Any]:
    return {
        "pools": {
            "dp": sim_pool(
                simulated={"max_num_seqs": 8, "tokens_per_second": 1.0, "first_token_delay_s": first_token_delay_s},
            )
        },
        "routes": {
            MODEL: {"policy": "spill", "pool": "dp", "gemini_model": "gemini-3.5-flash-lite"},
        },
        "gemini": {"api_key_env": "SERVE_APP_TEST_GEMINI_KEY", "base_url": "http://127.0.0.1:9"},
        "gateway": {"num_cpus": 0.1, "stream_idle_timeout_s": 30},
    }


def test_rolling_update_cuts_no_stream(ray_cluster: dict[str, Any]) -> None:
    from ray import serve

    base = deploy_declarative(ray_cluster, APP, config(0.05))
    root = base.removesuffix("/v1")
    try:
        wait_for(lambda: admin(root)["pools"]["dp"]["ready_replicas"] == 1, 60, what="a ready replica")
        (old,) = replica_stats(APP, "LLMServer-dp", 1)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": STREAM_S}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream, f"{base}/chat/completions", body, STREAM_S * 3) for _ in range(6)]
            time.sleep(5)
            # A changed pool config: a new code version, so Serve replaces every replica (rolling update).
            started = time.monotonic()
            deploy_declarative(ray_cluster, APP, config(0.06))
            wait_for(lambda: old not in replica_stats(APP, "LLMServer-dp", 1), 120, what="the new replica")
            results = [f.result() for f in futures]
            assert time.monotonic() - started < STREAM_S + 60
        for r in results:
            assert r["status"] == 200 and r["headers"]["x-served-by"] == "self-hosted"
            assert not errors(r) and not r["comments"] and r["events"][-1] == "[DONE]"
        assert admin(root)["pools"]["dp"]["breaker"] == "closed"
    finally:
        serve.delete(APP)
