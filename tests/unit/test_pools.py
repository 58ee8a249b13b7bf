"""The gateway's pool view: ready replicas, spilled demand for the autoscaler, the decision inputs."""

from __future__ import annotations

import time

from serve_app.config import RouteConfig
from serve_app.pools import PoolMonitor


def monitor_with(loads: dict[str, dict[str, float]], ages: dict[str, float] | None = None) -> PoolMonitor:
    m = PoolMonitor()
    m.configure({"a": RouteConfig(policy="self_hosted_only", pool="p")})
    now = time.time()
    ages = ages or {}
    m.update({"p": {rid: (now - ages.get(rid, 0.0), load) for rid, load in loads.items()}}, now_wall=now)
    return m


def test_ready_replicas_excludes_stale_and_unhealthy() -> None:
    m = monitor_with({"r1": {"waiting": 0}, "r2": {"healthy": 0.0}, "r3": {}}, ages={"r3": 60.0})
    assert m.ready_replicas("p") == 1
    assert m.describe()["p"]["ready_replicas"] == 1 and not m.saturated("p")


def test_a_stale_replica_does_not_saturate_the_pool() -> None:
    m = monitor_with({"r1": {}, "dead": {}}, ages={"dead": 30.0})
    assert not m.saturated("p")
    assert monitor_with({"dead": {}}, ages={"dead": 30.0}).saturated("p")  # none fresh: fail closed


def test_spilled_demand_is_published_per_pool() -> None:
    m = monitor_with({"r1": {}})
    state = m.pools["p"]
    state.spilled = 3
    m.spill_demand()
    state.spilled_tokens += 100
    time.sleep(0.05)
    demand = m.spill_demand()["p"]
    assert demand["spilled_ongoing"] == 3 and demand["spilled_tokens_per_s"] > 0


def test_explain_names_the_decision_inputs() -> None:
    m = monitor_with({"r1": {"waiting": 1}})
    info = m.explain("p")
    assert info["ready"] == 1 and info["waiting"] == 1 and info["score"] is not None
