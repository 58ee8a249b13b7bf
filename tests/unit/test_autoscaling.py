"""Table tests of the replica-count decision, plus the Ray wrapper against Ray 2.60's real types."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from serve_app.autoscaling import (
    CAPACITY_TOKENS_PER_S,
    DEMAND_TOKENS_PER_S,
    KV_CACHE_USAGE,
    LIVE_FIELDS,
    RUNNING,
    SPILLED_ONGOING,
    SPILLED_TOKENS_PER_S,
    STATE_KEY,
    TOKENS_PER_S,
    WAITING,
    LoadPolicy,
    PolicyParams,
    PolicyState,
    ReplicaLoad,
    decision_log_line,
    desired_replicas,
    observations_from_raw,
    ray_autoscaling_config,
)
from serve_app.config import AutoscalingConfig

NOW = 1_000_000.0


def cfg(**kw: Any) -> AutoscalingConfig:
    base: dict[str, Any] = {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_per_replica": 8,
        "upscale_delay_s": 0,
        "downscale_delay_s": 0,
        "stale_after_s": 10,
    }
    return AutoscalingConfig(**{**base, **kw})


def load(
    waiting: float = 0,
    running: float = 0,
    demand: float = 0,
    capacity: float = 0,
    age: float = 1.0,
    spilled: float = 0,
    spilled_tps: float = 0,
    slo: float = 0,
) -> ReplicaLoad:
    return ReplicaLoad(
        timestamp=NOW - age,
        waiting=waiting,
        running=running,
        tokens_per_s=demand,
        demand_tokens_per_s=demand,
        capacity_tokens_per_s=capacity,
        spilled_ongoing=spilled,
        spilled_tokens_per_s=spilled_tps,
        slo_target_ongoing=slo,
    )


def obs(*loads: ReplicaLoad | None) -> dict[str, ReplicaLoad | None]:
    return {f"r{i}": o for i, o in enumerate(loads)}


IDLE = load()
S = PolicyState()
TPS = {"policy": "tokens_per_second"}

# (id, config overrides, observations, current, state, expected replicas)
CASES: list[tuple[str, dict[str, Any], dict[str, ReplicaLoad | None], int, PolicyState, int]] = [
    ("idle at min stays", {}, obs(IDLE), 1, S, 1),
    ("idle pool shrinks to min", {}, obs(IDLE, IDLE, IDLE), 3, S, 1),
    ("steady at target", {}, obs(load(running=8), load(running=8)), 2, S, 2),
    ("steady just under a boundary", {}, obs(load(running=8), load(running=7.5)), 2, S, 2),
    ("float noise does not add a replica", {}, obs(load(running=8.0000000001), load(running=8)), 2, S, 2),
    ("step up counts waiting", {}, obs(load(waiting=20, running=10)), 1, S, 4),
    ("step down", {}, obs(load(running=4), IDLE, IDLE, IDLE), 4, S, 1),
    ("clamped to max", {}, obs(load(waiting=500)), 2, S, 4),
    ("clamped to min", {"min_replicas": 2}, obs(IDLE, IDLE), 2, S, 2),
    ("over max after a config change", {"upscale_delay_s": 60, "downscale_delay_s": 600}, obs(IDLE), 6, S, 4),
    ("under min after a config change", {"min_replicas": 2, "upscale_delay_s": 60}, obs(IDLE), 1, S, 2),
    # delays: the wish must persist for the delay, measured from the state's timestamp
    ("up waits for its delay", {"upscale_delay_s": 10}, obs(load(waiting=30)), 1, S, 1),
    ("up after its delay", {"upscale_delay_s": 10}, obs(load(waiting=30)), 1, PolicyState(up_since=NOW - 10), 4),
    ("up not yet", {"upscale_delay_s": 10}, obs(load(waiting=30)), 1, PolicyState(up_since=NOW - 9), 1),
    ("down waits for its delay", {"downscale_delay_s": 300}, obs(IDLE, IDLE), 2, S, 2),
    ("down after its delay", {"downscale_delay_s": 300}, obs(IDLE, IDLE), 2, PolicyState(down_since=NOW - 300), 1),
    (
        "down timer ignored when load wants up",
        {"upscale_delay_s": 10},
        obs(load(waiting=30)),
        1,
        PolicyState(down_since=NOW - 999),
        1,
    ),
    # missing / stale metrics
    ("stale replica blocks scale-down", {}, obs(IDLE, load(age=11)), 2, S, 2),
    ("unreported replica blocks scale-down", {}, obs(IDLE, None), 2, S, 2),
    (
        "unreported replica blocks an elapsed scale-down",
        {"downscale_delay_s": 5},
        obs(IDLE, None),
        2,
        PolicyState(down_since=NOW - 100),
        2,
    ),
    ("stale replica does not block scale-up", {}, obs(load(waiting=20), load(age=60)), 2, S, 3),
    ("stale load counts for nothing", {}, obs(load(running=8), load(waiting=100, age=60)), 2, S, 2),
    ("all stale: hold", {}, obs(load(waiting=100, age=60), load(age=60)), 2, S, 2),
    ("all unreported: hold", {}, obs(None, None, None), 3, S, 3),
    ("no replicas at all: hold", {"min_replicas": 0}, {}, 0, S, 0),
    ("no metrics, hold is still clamped", {}, {}, 7, S, 4),
    # tokens per second
    ("tps configured capacity", {**TPS, "target_tokens_per_second_per_replica": 100}, obs(load(demand=150)), 1, S, 2),
    (
        "tps configured capacity, boundary",
        {**TPS, "target_tokens_per_second_per_replica": 100},
        obs(load(demand=80), load(demand=80)),
        2,
        S,
        2,
    ),
    (
        "tps configured capacity, up",
        {**TPS, "target_tokens_per_second_per_replica": 100},
        obs(load(demand=200), load(demand=100)),
        2,
        S,
        4,
    ),
    (
        "tps learned capacity from state",
        TPS,
        obs(load(demand=150, running=1)),
        1,
        PolicyState(learned_capacity_tokens_per_s=100),
        2,
    ),
    ("tps not learned: queue arithmetic", TPS, obs(load(running=20, demand=500)), 1, S, 3),
    ("tps idle with learned capacity", TPS, obs(IDLE, IDLE), 2, PolicyState(learned_capacity_tokens_per_s=100), 1),
    # spilled demand (pool-wide: the same figure on every replica, counted once)
    ("spilled requests count as demand", {}, obs(load(running=8, spilled=8)), 1, S, 2),
    ("spilled is pool-wide: max, not sum", {}, obs(load(running=8, spilled=8), load(running=8, spilled=8)), 2, S, 3),
    (
        "replicas may disagree briefly: the max",
        {},
        obs(load(running=8, spilled=16), load(running=8, spilled=8)),
        2,
        S,
        4,
    ),
    ("step to 6 x capacity: max in one decision", {}, obs(load(waiting=4, running=8, spilled=36)), 1, S, 4),
    ("step to 2 x capacity: exactly enough", {"max_replicas": 10}, obs(load(running=8, spilled=8)), 1, S, 2),
    (
        "spill keeps a busy pool from shrinking",
        {},
        obs(load(running=8, spilled=20), load(running=8, spilled=20)),
        4,
        S,
        4,
    ),
    ("stale spill report counts for nothing", {}, obs(load(running=8), load(spilled=40, age=60)), 2, S, 2),
    ("spill waits for the upscale delay", {"upscale_delay_s": 10}, obs(load(running=8, spilled=24)), 1, S, 1),
    (
        "spill after the upscale delay",
        {"upscale_delay_s": 10},
        obs(load(running=8, spilled=24)),
        1,
        PolicyState(up_since=NOW - 10),
        4,
    ),
    (
        "tps adds spilled tokens/s",
        {**TPS, "target_tokens_per_second_per_replica": 100},
        obs(load(demand=80, spilled_tps=160)),
        1,
        S,
        3,
    ),
    (
        "tps spilled tokens/s is pool-wide",
        {**TPS, "target_tokens_per_second_per_replica": 100},
        obs(load(demand=80, spilled_tps=80), load(demand=80, spilled_tps=80)),
        2,
        S,
        3,
    ),
    ("tps not learned: spilled requests still count", TPS, obs(load(running=8, spilled=16, spilled_tps=999)), 1, S, 3),
    # a TTFT-SLO target (pool-wide, min over replicas) can only ask for more than the configured target
    ("slo stricter than target", {}, obs(load(running=8), load(running=8, slo=4)), 2, S, 4),
    ("slo looser than target: target decides", {}, obs(load(running=8, slo=16), load(running=8, slo=16)), 2, S, 2),
    ("slo counts spilled demand", {"max_replicas": 10}, obs(load(running=4, spilled=8, slo=4)), 1, S, 3),
    ("no slo reported: target", {}, obs(load(running=8), load(running=8)), 2, S, 2),
    ("slo stale: ignored", {}, obs(load(running=8), load(running=8), load(slo=1, age=60)), 3, S, 3),
    (
        "tps: slo asks for more than throughput",
        {**TPS, "target_tokens_per_second_per_replica": 100},
        obs(load(running=8, demand=80, slo=2)),
        1,
        S,
        4,
    ),
    (
        "tps: throughput asks for more than slo",
        {**TPS, "target_tokens_per_second_per_replica": 100},
        obs(load(running=2, demand=240, slo=2)),
        1,
        S,
        3,
    ),
]


@pytest.mark.parametrize(
    ("overrides", "observations", "current", "state", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_desired_replicas(
    overrides: dict[str, Any],
    observations: dict[str, ReplicaLoad | None],
    current: int,
    state: PolicyState,
    expected: int,
) -> None:
    n, _ = desired_replicas(cfg(**overrides), observations, current, state, NOW)
    assert n == expected


@pytest.mark.parametrize(
    ("observations", "state", "up_since", "down_since"),
    [
        (obs(load(waiting=30)), S, NOW, None),  # wish to go up starts now
        (obs(load(waiting=30)), PolicyState(up_since=NOW - 3), NOW - 3, None),  # and keeps its start
        (obs(load(waiting=30)), PolicyState(down_since=NOW - 3), NOW, None),  # direction flip restarts
        (obs(IDLE, IDLE, IDLE), S, None, NOW),
        (obs(IDLE, IDLE, IDLE), PolicyState(down_since=NOW - 3), None, NOW - 3),
        (obs(IDLE, IDLE, IDLE), PolicyState(up_since=NOW - 3), None, NOW),
        (obs(load(running=16), IDLE), PolicyState(up_since=NOW - 3, down_since=NOW - 3), None, None),  # steady
        (obs(IDLE, None, IDLE), PolicyState(down_since=NOW - 3), None, None),  # blind: timer restarts later
        ({}, PolicyState(up_since=NOW - 3), None, None),
    ],
)
def test_delay_timers(
    observations: dict[str, ReplicaLoad | None], state: PolicyState, up_since: float | None, down_since: float | None
) -> None:
    c = cfg(upscale_delay_s=10, downscale_delay_s=10)
    n, new = desired_replicas(c, observations, 2, state, NOW)
    assert n == 2
    assert (new.up_since, new.down_since) == (up_since, down_since)


@pytest.mark.parametrize(
    ("observations", "before", "after"),
    [
        (obs(load(waiting=2, running=8, capacity=120)), 0.0, 120.0),  # saturated: its peak is capacity
        (obs(load(waiting=0, running=8, capacity=120)), 0.0, 0.0),  # not saturated: says nothing
        (obs(load(waiting=2, capacity=90)), 120.0, 120.0),  # the learned peak only grows
        (obs(load(waiting=2, capacity=150), load(waiting=1, capacity=130)), 120.0, 150.0),
        (obs(load(waiting=2, capacity=500, age=60)), 0.0, 0.0),  # stale reports teach nothing
        (obs(load(waiting=2, capacity=float("inf"))), 10.0, 10.0),
    ],
)
def test_learned_capacity(observations: dict[str, ReplicaLoad | None], before: float, after: float) -> None:
    _, new = desired_replicas(cfg(**TPS), observations, 1, PolicyState(learned_capacity_tokens_per_s=before), NOW)
    assert new.learned_capacity_tokens_per_s == after


def test_learned_capacity_is_used_once_learned() -> None:
    c = cfg(**TPS, max_replicas=10)
    # Saturated replica at 100 tok/s with a queue as long as its batch: demand 200 tok/s.
    saturated = obs(load(waiting=8, running=8, demand=200, capacity=100))
    n, state = desired_replicas(c, saturated, 1, PolicyState(), NOW)
    assert state.learned_capacity_tokens_per_s == 100
    assert n == 3  # ceil(200 / (100 * 0.8)), not the queue arithmetic's ceil(16 / 8) = 2


def test_scale_to_zero_goes_through_one_without_a_second_delay() -> None:
    c = cfg(min_replicas=0, downscale_delay_s=60)
    idle = obs(IDLE, IDLE, IDLE)
    n, state = desired_replicas(c, idle, 3, PolicyState(down_since=NOW - 60), NOW)
    assert n == 1  # Ray only scales to zero from one replica
    n, _ = desired_replicas(c, obs(IDLE), 1, state, NOW + 0.1)
    assert n == 0


def test_a_sequence_of_ticks() -> None:
    """Load arrives, persists past the delay, then leaves; the target follows with the delays."""
    c = cfg(upscale_delay_s=5, downscale_delay_s=20)
    state, current, t = PolicyState(), 1, NOW
    history = []
    for second in range(60):
        waiting = 24.0 if 10 <= second < 30 else 0.0  # per replica: the load follows the replicas
        replicas = {f"r{i}": ReplicaLoad(timestamp=t + second, waiting=waiting) for i in range(current)}
        current, state = desired_replicas(c, replicas, current, state, t + second)
        history.append(current)
    assert history[14] == 1 and history[15] == 3  # 5 s after load arrived: 24 / 8 = 3
    assert history[20] == 3 and history[21] == 4  # 72 / 8 = 9, capped at 4, after another 5 s
    assert history[49] == 4 and history[50] == 1  # 20 s after the load left


# ------------------------------------------------------------------------------------------- Ray side
def _series(points: list[tuple[float, float]]) -> list[Any]:
    from ray.serve._private.common import TimeStampedValue

    return [TimeStampedValue(timestamp=ts, value=v) for ts, v in points]


def _raw(replicas: dict[Any, dict[str, list[tuple[float, float]]]]) -> dict[str, dict[Any, list[Any]]]:
    out: dict[str, dict[Any, list[Any]]] = {}
    for rid, stats in replicas.items():
        for key, points in stats.items():
            out.setdefault(key, {})[rid] = _series(points)
    return out


def _full(ts: float, waiting: float = 0.0, running: float = 0.0) -> dict[str, list[tuple[float, float]]]:
    return {
        WAITING: [(ts - 1, waiting), (ts, waiting)],
        RUNNING: [(ts - 1, running), (ts, running)],
        KV_CACHE_USAGE: [(ts, 0.1)],
        TOKENS_PER_S: [(ts, 10.0)],
        DEMAND_TOKENS_PER_S: [(ts, 10.0)],
        CAPACITY_TOKENS_PER_S: [(ts - 1, 30.0), (ts, 20.0)],
    }


def test_observations_from_raw_series() -> None:
    from ray.serve._private.common import DeploymentID, ReplicaID

    dep = DeploymentID(name="LLMServer-p", app_name="default")
    a, b, c = (ReplicaID(unique_id=x, deployment_id=dep) for x in "abc")
    stats = _full(NOW)
    stats[WAITING] = [(NOW - 2, 0.0), (NOW - 1, 3.0), (NOW, 6.0)]
    partial = _full(NOW)
    del partial[DEMAND_TOKENS_PER_S]
    got = observations_from_raw(_raw({a: stats, b: partial}), [a, b, c])
    assert got["b"] is None and got["c"] is None  # a missing stat, and no report at all
    la = got["a"]
    assert la is not None
    assert la.waiting == pytest.approx(3.0)  # mean over the look-back window
    assert la.capacity_tokens_per_s == 30.0  # a peak stays a peak
    assert la.timestamp == NOW
    stats[KV_CACHE_USAGE] = [(NOW - 8, 0.1)]  # one stat stopped updating: the replica is as old as it
    la = observations_from_raw(_raw({a: stats}), [a])["a"]
    assert la is not None and la.timestamp == NOW - 8
    assert observations_from_raw(None, [a]) == {"a": None}


def test_observations_spill_stats_are_optional() -> None:
    old = _full(NOW)  # a replica of the previous version: no spill stats
    new = {**_full(NOW), SPILLED_ONGOING: [(NOW - 1, 10.0), (NOW, 14.0)], SPILLED_TOKENS_PER_S: [(NOW, 300.0)]}
    got = observations_from_raw(_raw({"old": old, "new": new}), ["old", "new"])
    lo, ln = got["old"], got["new"]
    assert lo is not None and (lo.spilled_ongoing, lo.spilled_tokens_per_s) == (0.0, 0.0)
    assert ln is not None and (ln.spilled_ongoing, ln.spilled_tokens_per_s) == (12.0, 300.0)
    new[SPILLED_ONGOING] = [(NOW - 30, 14.0)]  # a spill stat that stopped updating ages the replica
    ln = observations_from_raw(_raw({"new": new}), ["new"])["new"]
    assert ln is not None and ln.timestamp == NOW - 30


def _context(
    ray_cfg: Any,
    replicas: dict[Any, dict[str, list[tuple[float, float]]]],
    target: int,
    state: dict[str, Any],
    now: float,
    queued: float = 0.0,
) -> Any:
    """An AutoscalingContext built the way DeploymentAutoscalingState.get_autoscaling_context does (2.60)."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.config import AutoscalingContext

    dep = DeploymentID(name="LLMServer-p", app_name="default")
    return AutoscalingContext(
        deployment_id=dep,
        deployment_name=dep.name,
        app_name=dep.app_name,
        current_num_replicas=len(replicas),
        target_num_replicas=target,
        running_replicas=list(replicas),
        total_num_requests=lambda: queued,
        capacity_adjusted_min_replicas=ray_cfg.min_replicas,
        capacity_adjusted_max_replicas=ray_cfg.max_replicas,
        policy_state=dict(state),
        current_time=now,
        config=ray_cfg,
        total_queued_requests=lambda: queued,
        aggregated_metrics=lambda: {},
        raw_metrics=lambda: _raw(replicas),
        last_scale_up_time=None,
        last_scale_down_time=None,
    )


def test_ray_config_validates_and_policy_runs_under_rays_wrapper() -> None:
    """The dict passes Ray's AutoscalingConfig; Ray's own wrapper adds no delay on top of ours."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    ours = cfg(max_replicas=5, upscale_delay_s=10, downscale_delay_s=30, metrics_interval_s=0.5)
    ray_cfg = RayAutoscalingConfig(**ray_autoscaling_config(ours))
    assert (ray_cfg.upscale_delay_s, ray_cfg.downscale_delay_s) == (0.0, 0.0)
    assert ray_cfg.look_back_period_s > ray_cfg.metrics_interval_s == 0.5
    policy = _apply_autoscaling_config(_resolve_policy_callable(ray_cfg.policy))  # as register() does

    dep = DeploymentID(name="LLMServer-p", app_name="default")
    r1, r2 = (ReplicaID(unique_id=x, deployment_id=dep) for x in ("one", "two"))
    busy = {r1: _full(NOW, waiting=20, running=8), r2: _full(NOW, waiting=20, running=8)}
    n, state = policy(_context(ray_cfg, busy, 2, {}, NOW))
    assert n == 2 and state[STATE_KEY]["up_since"] == NOW  # our delay is running
    n, state = policy(_context(ray_cfg, busy, 2, state, NOW + 9))
    assert n == 2
    n, state = policy(_context(ray_cfg, busy, 2, state, NOW + 10))
    assert n == 5  # 56 ongoing / 8 = 7, clamped to 5; exactly when our delay ends, not later
    # A replica that has not reported yet never lets the pool shrink.
    for t in (NOW + 100, NOW + 200):
        n, state = policy(_context(ray_cfg, {r1: _full(t), r2: {}}, 5, state, t))
        assert n == 5
    n, state = policy(_context(ray_cfg, {r1: _full(NOW + 201), r2: _full(NOW + 201)}, 5, state, NOW + 201))
    assert n == 5 and state[STATE_KEY]["down_since"] == NOW + 201  # seen again: the delay starts now


def test_policy_class_with_public_context() -> None:
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    ours = cfg(max_replicas=3)
    ray_cfg = RayAutoscalingConfig(**ray_autoscaling_config(ours))
    dep = DeploymentID(name="LLMServer-p", app_name="default")
    r1 = ReplicaID(unique_id="one", deployment_id=dep)
    policy = LoadPolicy(**ray_cfg.policy.policy_kwargs)
    n, state = policy(_context(ray_cfg, {r1: _full(NOW, waiting=10, running=8)}, 1, {"__decision_counters": 0}, NOW))
    assert n == 3
    assert PolicyState.from_dict(state[STATE_KEY]).reason.startswith("up 1->3")


def test_bounds_and_queue_target_are_read_live_from_rays_fields() -> None:
    """A Serve config edit of min/max/target reaches the same policy instance through ctx, not kwargs."""
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    ours = cfg(max_replicas=3, target_ongoing_per_replica=8)
    kwargs = ray_autoscaling_config(ours)["policy"]["policy_kwargs"]
    assert not (LIVE_FIELDS | {"metrics_interval_s"}) & set(kwargs)  # a bound edit leaves the code version
    policy = LoadPolicy(**kwargs)
    dep = DeploymentID(name="LLMServer-p", app_name="default")
    r1 = ReplicaID(unique_id="one", deployment_id=dep)
    busy = {r1: _full(NOW, waiting=30, running=10)}  # 40 ongoing
    assert policy(_context(RayAutoscalingConfig(**ray_autoscaling_config(ours)), busy, 1, {}, NOW))[0] == 3
    wider = cfg(max_replicas=6, target_ongoing_per_replica=8)
    assert policy(_context(RayAutoscalingConfig(**ray_autoscaling_config(wider)), busy, 1, {}, NOW))[0] == 5
    finer = cfg(max_replicas=10, target_ongoing_per_replica=5)
    assert policy(_context(RayAutoscalingConfig(**ray_autoscaling_config(finer)), busy, 1, {}, NOW))[0] == 8
    floor = cfg(min_replicas=2, max_replicas=10)
    assert policy(_context(RayAutoscalingConfig(**ray_autoscaling_config(floor)), {r1: _full(NOW)}, 2, {}, NOW))[0] == 2


def test_zero_replicas_with_queued_wake_calls() -> None:
    """Ray 2.60's wrapper answers 0 replicas + queued requests with 1 before calling us; without a
    queue it calls us and we hold at zero. Our own fallback gives the same answer if called."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    ray_cfg = RayAutoscalingConfig(**ray_autoscaling_config(cfg(min_replicas=0, upscale_delay_s=30)))
    wrapped = _apply_autoscaling_config(_resolve_policy_callable(ray_cfg.policy))
    assert wrapped(_context(ray_cfg, {}, 0, {}, NOW))[0] == 0  # idle at zero stays at zero
    assert wrapped(_context(ray_cfg, {}, 0, {}, NOW, queued=1.0))[0] == 1  # one wake call: one replica
    bare = LoadPolicy(**ray_cfg.policy.policy_kwargs)  # what a Ray without the short cut would call
    assert bare(_context(ray_cfg, {}, 0, {}, NOW, queued=1.0))[0] == 1
    assert bare(_context(ray_cfg, {}, 0, {}, NOW))[0] == 0


@pytest.mark.parametrize(
    ("overrides", "current", "queued", "expected"),
    [
        ({"min_replicas": 0}, 0, 1.0, 1),  # wake
        ({"min_replicas": 0}, 0, 0.0, 0),  # nobody asked
        ({"min_replicas": 0}, 1, 1.0, 1),  # already starting: hold
        ({"min_replicas": 0, "max_replicas": 1}, 0, 5.0, 1),
    ],
)
def test_wake_from_zero(overrides: dict[str, Any], current: int, queued: float, expected: int) -> None:
    n, _ = desired_replicas(cfg(**overrides), {}, current, PolicyState(), NOW, queued_at_handles=queued)
    assert n == expected


def test_decision_log_line_explains_the_change() -> None:
    c = PolicyParams.from_kwargs(cfg(max_replicas=4, target_ongoing_per_replica=4).model_dump())
    n, state = desired_replicas(c, obs(load(running=4, spilled=20)), 1, PolicyState(), NOW)
    line = json.loads(decision_log_line("LLMServer-sim", 1, n, c, state))
    assert (line["deployment"], line["from"], line["to"]) == ("LLMServer-sim", 1, 4)
    assert line["inputs"]["ongoing"] == 4 and line["inputs"]["spilled_ongoing"] == 20
    assert line["inputs"]["max_replicas"] == 4 and line["inputs"]["target_ongoing_per_replica"] == 4
    assert line["reason"].startswith("up 1->4") and "spilled 20.0" in line["reason"]


def test_policy_unpickles_where_serve_app_is_not_importable(tmp_path: Any) -> None:
    """Ray cloudpickles the module by value into the controller; it must not need serve_app there."""
    from ray.serve.config import AutoscalingConfig as RayAutoscalingConfig

    ray_cfg = RayAutoscalingConfig(**ray_autoscaling_config(cfg()))
    blob = tmp_path / "policy.pkl"
    blob.write_bytes(ray_cfg.policy.get_serialized_policy_def())
    script = textwrap.dedent(
        f"""
        import sys
        sys.path = [p for p in sys.path if p not in ("", {str(__import__("os").getcwd())!r})]
        import ray.cloudpickle as cp
        cls = cp.loads(open({str(blob)!r}, "rb").read())
        assert "serve_app" not in sys.modules, sorted(m for m in sys.modules if m.startswith("serve_app"))
        p = cls(min_replicas=2, max_replicas=3)
        class Ctx:
            current_time = 5.0
            raw_metrics = {{}}
            running_replicas = []
            policy_state = {{}}
            target_num_replicas = 1
            deployment_name = "d"
        print(p(Ctx())[0])
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "2"  # no metrics: hold, clamped to min


def _step_trace(report_spill: bool) -> list[int]:
    """Demo pool (4 streams/replica, target 4, max 4, upscale delay 3 s) under a step from 2 to 24
    streams with spill on: the gateway admits up to 6 in flight per replica and spills the rest."""
    c = cfg(max_replicas=4, target_ongoing_per_replica=4, upscale_delay_s=3, downscale_delay_s=60)
    state, current, history = PolicyState(), 1, []
    for second in range(20):
        streams = 2 if second < 5 else 24
        admitted = min(streams, 6 * current)
        spilled = streams - admitted if report_spill else 0
        per = admitted / current
        replicas = {
            f"r{i}": ReplicaLoad(
                timestamp=NOW + second, running=min(per, 4), waiting=max(0, per - 4), spilled_ongoing=spilled
            )
            for i in range(current)
        }
        current, state = desired_replicas(c, replicas, current, state, NOW + second)
        history.append(current)
    return history


def test_step_with_spill_reaches_max_in_one_upscale_delay() -> None:
    with_spill = _step_trace(report_spill=True)
    assert with_spill[7] == 1 and with_spill[8] == 4  # the step at 5 s; one decision 3 s later
    without = _step_trace(report_spill=False)  # what the pool alone shows: 6 per replica, 1.5 x per step
    assert without[5:] == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4]  # one replica per delay
