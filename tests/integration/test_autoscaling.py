"""Autoscaling on queue depth through the real Serve controller (simulated engine: seconds, not minutes)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.conftest import deploy
from tests.support import sim_pool, wait_for

APP = "scale"
UPSCALE_DELAY_S = 2.0
DOWNSCALE_DELAY_S = 8.0
REQUEST_S = 1.0  # 20 tokens at 20 tokens/s: how long load lingers after the stop signal


@pytest.fixture(scope="module")
def scale_base(ray_cluster: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    pool = sim_pool(
        simulated={"max_num_seqs": 2, "tokens_per_second": 20.0, "first_token_delay_s": 0.05},
        deployment={
            "num_replicas": None,
            "num_cpus": 0.1,
            "autoscaling": {
                "policy": "queue_depth",
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_per_replica": 2,
                "upscale_delay_s": UPSCALE_DELAY_S,
                "downscale_delay_s": DOWNSCALE_DELAY_S,
                "metrics_interval_s": 0.5,
            },
        },
    )
    yield deploy(ray_cluster, APP, {"pools": {"pool": pool}, "gateway": {"num_cpus": 0.1}})
    serve.delete(APP)


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments["LLMServer-pool"]
    return int(status.replica_states.get("RUNNING", 0))


def _load(base: str, stop: threading.Event, results: list[int]) -> None:
    body = {"model": "pool", "messages": [{"role": "user", "content": "go"}], "max_tokens": 20, "stream": True}
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            with client.stream("POST", f"{base}/chat/completions", json=body) as r:
                for _ in r.iter_lines():
                    pass
                results.append(r.status_code)


def test_step_up_scales_out_then_back_to_the_warm_pool(scale_base: str) -> None:
    assert running_replicas() == 1  # the warm pool: min_replicas, even when idle
    stop = threading.Event()
    results: list[int] = []
    workers = [threading.Thread(target=_load, args=(scale_base, stop, results)) for _ in range(8)]
    started = time.monotonic()
    for w in workers:
        w.start()
    try:
        # 8 sequences wanted / target 2 per replica → 4, clamped to max 3.
        wait_for(lambda: running_replicas() >= 2, timeout=UPSCALE_DELAY_S + 20, what="scale-up")
        scaled_after = time.monotonic() - started
        wait_for(lambda: running_replicas() == 3, timeout=30, what="scale to max_replicas")
    finally:
        stop.set()
        stopped = time.monotonic()
        for w in workers:
            w.join(timeout=60)
    assert results and set(results) == {200}
    assert scaled_after >= UPSCALE_DELAY_S * 0.5  # the upscale delay was respected (not an instant jump)
    wait_for(lambda: running_replicas() == 1, timeout=DOWNSCALE_DELAY_S + 30, what="scale back to min")
    # Demand falls once the last requests end (≤ REQUEST_S after the stop); the delay runs from there.
    assert time.monotonic() - stopped >= DOWNSCALE_DELAY_S - REQUEST_S
