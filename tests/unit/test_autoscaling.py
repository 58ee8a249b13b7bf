"""Table tests of the replica-count decision (the Ray wrapper: test_autoscaling_ray.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.autoscaling import (
    PolicyParams,
    PolicyState,
    ReplicaLoad,
    decision_log_line,
    desired_replicas,
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
        (obs(load(waiting=30)), S, NOW - 1, None),  # the wish starts when it was reported (1 s ago)
        (obs(load(waiting=30)), PolicyState(up_since=NOW - 3), NOW - 3, None),  # and keeps its start
        (obs(load(waiting=30)), PolicyState(down_since=NOW - 3), NOW - 1, None),  # direction flip restarts
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
    # 72 / 8 = 9, capped at 4: the demand has persisted past the delay already, so no second delay
    assert history[15] == 3 and history[16] == 4
    assert history[49] == 4 and history[50] == 1  # 20 s after the load left


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
    # Blind to the spilled demand it takes a decision per report (here replicas start instantly; in a
    # real pool each step also waits for the new replicas to start and show more load).
    assert without[5:] == [1, 1, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]
