"""Autoscaling on queue depth through the real Serve controller (simulated engine: seconds, not minutes)."""

from __future__ import annotations

import glob
import json
import os
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


# --------------------------------------------------------------------- live bounds and scale from zero
LIVE_APP = "scalelive"


def _live_config(**autoscaling: Any) -> dict[str, Any]:
    scaling = {
        "policy": "queue_depth",
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_per_replica": 4,
        "upscale_delay_s": 1,
        "downscale_delay_s": 1,
        "metrics_interval_s": 0.5,
        **autoscaling,
    }
    pool = sim_pool(deployment={"num_replicas": None, "num_cpus": 0.1, "autoscaling": scaling})
    return {"pools": {"pool": pool}, "gateway": {"num_cpus": 0.1}}


def _pool_details(app: str) -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployment: dict[str, Any] = details["applications"][app]["deployments"]["LLMServer-pool"]
    return deployment


def _running_ids(app: str) -> set[str]:
    return {r["replica_id"] for r in _pool_details(app)["replicas"] if r["state"] == "RUNNING"}


def _autoscaling(app: str) -> dict[str, Any]:
    config: dict[str, Any] = _pool_details(app)["deployment_config"]["autoscaling_config"]
    return config


def test_bounds_change_live_policy_kwargs_restart(ray_cluster: dict[str, Any]) -> None:
    from ray import serve

    from tests.integration.conftest import deploy_declarative

    try:
        deploy_declarative(ray_cluster, LIVE_APP, _live_config())
        wait_for(lambda: len(_running_ids(LIVE_APP)) == 1, timeout=60, what="one engine replica")
        (engine,) = _running_ids(LIVE_APP)

        # Bounds and the queue target: Serve updates the controller in place; the engine keeps running.
        deploy_declarative(
            ray_cluster, LIVE_APP, _live_config(min_replicas=2, max_replicas=5, target_ongoing_per_replica=3)
        )
        scaling = _autoscaling(LIVE_APP)
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (2, 5, 3)
        wait_for(lambda: len(_running_ids(LIVE_APP)) == 2, timeout=60, what="the new min_replicas applied")
        assert engine in _running_ids(LIVE_APP)  # the first engine was never restarted

        # policy_kwargs (here a delay): Serve hashes them into the code version (deploy_utils.py
        # get_app_code_version), so the pool's replicas are replaced. Documented, and pinned here.
        before = _running_ids(LIVE_APP)
        deploy_declarative(ray_cluster, LIVE_APP, _live_config(min_replicas=2, max_replicas=5, upscale_delay_s=2))
        wait_for(lambda: len(_running_ids(LIVE_APP) - before) == 2, timeout=90, what="replicas replaced")
    finally:
        serve.delete(LIVE_APP)


def test_scale_to_zero_and_wake_by_a_queued_call(ray_cluster: dict[str, Any]) -> None:
    """min_replicas 0: idle → 0 replicas; one call queued at the handle (what the gateway's wake() is)
    brings a replica back without any replica metrics (Ray 2.60's cold-start path)."""
    from ray import serve

    from tests.integration.conftest import deploy_declarative

    app = "scalezero"
    try:
        deploy_declarative(ray_cluster, app, _live_config(min_replicas=0, initial_replicas=1))
        wait_for(lambda: len(_running_ids(app)) == 0, timeout=60, what="idle pool scaled to zero")
        handle = serve.get_deployment_handle("LLMServer-pool", app_name=app)
        started = time.monotonic()
        stats = handle.stats.remote().result(timeout_s=60)  # queued at the handle until a replica runs
        woke_after = time.monotonic() - started
        assert stats["replica_id"] in _running_ids(app)
        assert woke_after < 30
        print(f"woke from zero in {woke_after:.1f} s")
        # The scale-down to zero was explained in the controller's log, as one JSON line.
        lines = [json.loads(line[line.index("{") :]) for line in _controller_log() if "autoscaling.decision" in line]
        assert any(d["deployment"] == "LLMServer-pool" and d["to"] == 0 and "ongoing" in d["inputs"] for d in lines)
    finally:
        serve.delete(app)


def _controller_log() -> list[str]:
    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")
    out: list[str] = []
    for path in glob.glob(os.path.join(logs, "controller_*.log")):
        with open(path, encoding="utf-8", errors="replace") as f:
            out.extend(f)
    return out
