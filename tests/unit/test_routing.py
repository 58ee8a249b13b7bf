"""Table tests for the pure routing decisions: saturation score, hysteresis, breaker, decide."""

from __future__ import annotations

import math

import pytest

from serve_app.config import BreakerConfig, SaturationThresholds
from serve_app.routing import (
    BreakerState,
    CircuitBreaker,
    PoolView,
    ReplicaLoad,
    SaturationState,
    decide,
    saturation_score,
)

TH = SaturationThresholds(max_waiting_per_replica=2, max_kv_cache_usage=0.9, max_inflight_per_replica=4)


def r(waiting: float = 0, kv: float = 0.0, age: float = 0.1) -> ReplicaLoad:
    return ReplicaLoad(waiting=waiting, running=0, kv_cache_usage=kv, tokens_per_s=0, age_s=age)


@pytest.mark.parametrize(
    ("view", "expected"),
    [
        (PoolView((r(),)), 0.0),
        (PoolView((r(waiting=1),)), 0.5),
        (PoolView((r(waiting=2), r(waiting=0))), 0.5),  # per replica
        (PoolView((r(waiting=4),)), 2.0),
        (PoolView((r(kv=0.45),)), 0.5),
        (PoolView((r(kv=0.1), r(kv=0.9))), 1.0),  # the fullest replica counts
        (PoolView((r(),), inflight=4), 1.0),
        (PoolView((r(), r()), inflight=4), 0.5),
        (PoolView(()), math.inf),  # nobody reported: fail closed
        (PoolView((r(age=10),)), math.inf),  # stale
        (PoolView((r(), r(age=10))), 0.0),  # a stale replica is ignored: the fresh one is scored
        (PoolView((r(age=10), r(age=10))), math.inf),  # none fresh: fail closed
    ],
)
def test_saturation_score(view: PoolView, expected: float) -> None:
    assert saturation_score(view, TH) == pytest.approx(expected)


def test_hysteresis_enters_at_enter_and_leaves_below_exit() -> None:
    th = SaturationThresholds(enter=1.0, exit=0.8)
    state = SaturationState()
    trace = [state.update(s, th) for s in (0.5, 0.99, 1.0, 0.9, 0.81, 0.8, 0.79, 0.95, 1.2)]
    assert trace == [False, False, True, True, True, True, False, False, True]


CFG = BreakerConfig(
    failure_threshold=3, error_rate_threshold=0.5, window_s=10, min_requests_in_window=6, open_s=5, half_open_probes=2
)


def test_breaker_opens_on_consecutive_failures_and_recovers_through_probes() -> None:
    b = CircuitBreaker(CFG)
    for t in (0.0, 0.1):
        b.record(t, ok=False)
    assert b.current(0.2) is BreakerState.CLOSED
    b.record(0.3, ok=False)
    assert b.current(0.3) is BreakerState.OPEN and not b.allow(1.0)
    assert b.current(5.4) is BreakerState.HALF_OPEN
    assert b.allow(5.4) and b.allow(5.4) and not b.allow(5.4)  # two probes at a time
    b.record(5.5, ok=True)
    assert b.current(5.5) is BreakerState.HALF_OPEN
    b.record(5.6, ok=True)
    assert b.current(5.6) is BreakerState.CLOSED and b.allow(5.7)


def test_breaker_failed_probe_reopens() -> None:
    b = CircuitBreaker(CFG)
    for t in (0.0, 0.1, 0.2):
        b.record(t, ok=False)
    assert b.allow(6.0)
    b.record(6.1, ok=False)
    assert b.current(6.2) is BreakerState.OPEN and b.current(11.0) is BreakerState.OPEN
    assert b.current(11.2) is BreakerState.HALF_OPEN


def test_breaker_opens_on_error_rate_in_window() -> None:
    b = CircuitBreaker(CFG)
    for i, ok in enumerate([True, False, True, False, True, False]):  # never 3 in a row, 50% errors
        b.record(i * 0.1, ok=ok)
    assert b.current(0.6) is BreakerState.OPEN


def test_breaker_error_rate_forgets_old_events() -> None:
    b = CircuitBreaker(CFG)
    for i in range(5):
        b.record(i * 0.1, ok=False if i % 2 else True)
    b.record(20.0, ok=False)  # the earlier events fell out of the 10 s window
    assert b.current(20.0) is BreakerState.CLOSED


@pytest.mark.parametrize(
    ("policy", "saturated", "allows", "available", "supports", "expected"),
    [
        ("self_hosted_only", True, False, True, True, ("self_hosted", "")),
        ("hosted_only", False, True, True, True, ("gemini", "")),
        ("hosted_only", False, True, False, True, ("reject", "hosted_unavailable")),
        ("hosted_only", False, True, True, False, ("reject", "hosted_unavailable")),
        ("spill", False, True, True, True, ("self_hosted", "")),
        ("spill", True, True, True, True, ("gemini", "saturated")),
        ("spill", True, True, False, True, ("self_hosted", "")),  # nothing to spill to: queue at home
        ("spill", True, True, True, False, ("self_hosted", "")),  # e.g. logprobs: never silently degraded
        ("spill", False, False, True, True, ("gemini", "degraded")),
        ("spill", False, False, False, True, ("reject", "degraded")),
    ],
)
def test_decide(
    policy: str, saturated: bool, allows: bool, available: bool, supports: bool, expected: tuple[str, str]
) -> None:
    d = decide(
        policy,
        saturated=saturated,
        breaker_allows=allows,
        hosted_available=available,
        hosted_supports_request=supports,
    )
    assert (d.target, d.reason) == expected


# ------------------------------------------------------------------------------------ breaker tickets
TCFG = BreakerConfig(
    failure_threshold=2, window_s=10, min_requests_in_window=100, open_s=5, half_open_probes=1, probe_timeout_s=30
)


def _opened(now: float = 0.0) -> CircuitBreaker:
    b = CircuitBreaker(TCFG)
    for _ in range(2):
        t = b.admit(now)
        assert t is not None
        b.settle(t, now, False)
    assert b.current(now) is BreakerState.OPEN
    return b


def test_neutral_outcomes_never_open_the_breaker() -> None:
    """Client aborts (and back-pressure) settle neutral: ten of them leave the breaker closed."""
    b = CircuitBreaker(TCFG)
    for i in range(10):
        t = b.admit(float(i))
        assert t is not None
        b.settle(t, float(i), None)
    assert b.current(10.0) is BreakerState.CLOSED and b.consecutive_failures == 0


def test_a_ticket_settles_once() -> None:
    b = CircuitBreaker(TCFG)
    t = b.admit(0.0)
    assert t is not None
    b.settle(t, 0.0, False)
    b.settle(t, 0.1, False)  # a second settle (e.g. a finally after an except) counts nothing
    assert b.consecutive_failures == 1 and b.current(0.1) is BreakerState.CLOSED


def test_would_allow_takes_no_probe_slot() -> None:
    b = _opened()
    for _ in range(5):  # a saturated spill or a client that leaves never takes the probe
        assert b.would_allow(5.0)
    assert b.probes_in_flight == 0


def test_probe_slot_is_returned_by_a_neutral_settle() -> None:
    b = _opened()
    probe = b.admit(5.0)
    assert probe is not None and probe.probe and not b.would_allow(5.0)
    b.settle(probe, 5.5, None)  # the probe's client left: no verdict, the slot is free again
    assert b.current(5.5) is BreakerState.HALF_OPEN and b.would_allow(5.5)


def test_probe_that_never_returns_times_out() -> None:
    b = _opened()
    assert b.admit(5.0) is not None and not b.would_allow(6.0)
    assert b.would_allow(5.0 + TCFG.probe_timeout_s)  # half-open can never stick


def test_successful_probe_closes_failed_probe_reopens() -> None:
    b = _opened()
    probe = b.admit(5.0)
    assert probe is not None
    b.settle(probe, 5.1, True)
    assert b.current(5.1) is BreakerState.CLOSED
    b2 = _opened()
    probe2 = b2.admit(5.0)
    assert probe2 is not None
    b2.settle(probe2, 5.1, False)
    assert b2.current(5.2) is BreakerState.OPEN


def test_unhealthy_replicas_are_not_scored() -> None:
    sick = ReplicaLoad(waiting=0, running=0, kv_cache_usage=0, tokens_per_s=0, age_s=0.1, healthy=False)
    assert saturation_score(PoolView((sick,)), TH) == math.inf
    assert saturation_score(PoolView((sick, r(waiting=1))), TH) == pytest.approx(0.5)
