"""Pure routing decisions: pool saturation with hysteresis, a circuit breaker, and where a request goes.

Nothing here does I/O or reads a clock: callers pass `now`. The gateway owns the state objects and feeds
them what it observes (pool load from the LoadBoard, its own in-flight count, request outcomes).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from serve_app.config import BreakerConfig, SaturationThresholds

Target = Literal["self_hosted", "gemini", "reject"]


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    waiting: float
    running: float
    kv_cache_usage: float
    tokens_per_s: float
    age_s: float  # how long ago the replica reported this


@dataclass(frozen=True, slots=True)
class PoolView:
    """What the gateway knows about one pool at one moment."""

    replicas: tuple[ReplicaLoad, ...]
    inflight: int = 0  # this gateway's requests on the self-hosted path

    @property
    def waiting(self) -> float:
        return sum(r.waiting for r in self.replicas)

    @property
    def running(self) -> float:
        return sum(r.running for r in self.replicas)

    @property
    def kv_cache_usage(self) -> float:
        return max((r.kv_cache_usage for r in self.replicas), default=0.0)

    @property
    def tokens_per_s(self) -> float:
        return sum(r.tokens_per_s for r in self.replicas)


def saturation_score(view: PoolView, th: SaturationThresholds) -> float:
    """max(waiting/replica ÷ limit, KV use ÷ limit, in-flight/replica ÷ limit); stale or empty = inf.

    A score of 1.0 means "at the limit". Fail closed: load nobody has reported recently is not trusted.
    """
    fresh = [r for r in view.replicas if r.age_s <= th.stale_after_s]
    if not fresh or len(fresh) < len(view.replicas):
        return math.inf
    n = len(fresh)
    waiting = sum(r.waiting for r in fresh) / n
    kv = max(r.kv_cache_usage for r in fresh)
    score = max(
        waiting / th.max_waiting_per_replica if th.max_waiting_per_replica > 0 else (math.inf if waiting else 0.0),
        kv / th.max_kv_cache_usage,
    )
    if th.max_inflight_per_replica is not None:
        score = max(score, view.inflight / n / th.max_inflight_per_replica)
    return score


@dataclass(slots=True)
class SaturationState:
    """Hysteresis: enter at `enter`, leave only below `exit`, so the decision does not flap."""

    saturated: bool = False
    score: float = 0.0

    def update(self, score: float, th: SaturationThresholds) -> bool:
        self.score = score
        if self.saturated:
            self.saturated = score >= th.exit
        else:
            self.saturated = score >= th.enter
        return self.saturated


class BreakerState(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(slots=True)
class CircuitBreaker:
    """Opens on consecutive failures or an error rate over a window; half-open probes close it again."""

    cfg: BreakerConfig
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    consecutive_failures: int = 0
    probes_in_flight: int = 0
    probe_successes: int = 0
    window: deque[tuple[float, bool]] = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        while self.window and now - self.window[0][0] > self.cfg.window_s:
            self.window.popleft()

    def current(self, now: float) -> BreakerState:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cfg.open_s:
            self.state = BreakerState.HALF_OPEN
            self.probes_in_flight = self.probe_successes = 0
        return self.state

    def allow(self, now: float) -> bool:
        """May a request go to the pool now? In half-open, only a few probes at a time."""
        state = self.current(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and self.probes_in_flight < self.cfg.half_open_probes:
            self.probes_in_flight += 1
            return True
        return False

    def record(self, now: float, ok: bool) -> None:
        self._trim(now)
        self.window.append((now, ok))
        state = self.current(now)
        if state is BreakerState.HALF_OPEN:
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            if not ok:
                self._open(now)
                return
            self.probe_successes += 1
            if self.probe_successes >= self.cfg.half_open_probes:
                self.state = BreakerState.CLOSED
                self.consecutive_failures = 0
                self.window.clear()
            return
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1
        if state is BreakerState.CLOSED and not ok and self._should_open():
            self._open(now)

    def _should_open(self) -> bool:
        if self.consecutive_failures >= self.cfg.failure_threshold:
            return True
        total = len(self.window)
        if total < self.cfg.min_requests_in_window:
            return False
        failures = sum(1 for _, ok in self.window if not ok)
        return failures / total >= self.cfg.error_rate_threshold

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.probes_in_flight = self.probe_successes = 0


@dataclass(frozen=True, slots=True)
class Decision:
    target: Target
    reason: str  # "" when the preferred path is taken; else saturated | degraded | unsupported | ...


def decide(
    policy: str,
    *,
    saturated: bool,
    breaker_allows: bool,
    hosted_available: bool,
    hosted_supports_request: bool,
) -> Decision:
    """Where a request goes before anything is sent.

    - self_hosted_only: always the pool (overload surfaces as back-pressure → 429).
    - hosted_only: Gemini, or reject when it is unavailable or cannot honour the request.
    - spill: the pool unless it is degraded (breaker open) or saturated and Gemini can take the request;
      a request Gemini cannot honour stays self-hosted rather than being silently degraded.
    """
    if policy == "self_hosted_only":
        return Decision("self_hosted", "")
    hosted_ok = hosted_available and hosted_supports_request
    if policy == "hosted_only":
        return Decision("gemini", "") if hosted_ok else Decision("reject", "hosted_unavailable")
    if not breaker_allows:
        return Decision("gemini", "degraded") if hosted_ok else Decision("reject", "degraded")
    if saturated and hosted_ok:
        return Decision("gemini", "saturated")
    return Decision("self_hosted", "")


def may_spill_after_failure(policy: str, hosted_available: bool, hosted_supports_request: bool) -> bool:
    """A self-hosted attempt failed before its first byte: may the request go to Gemini instead?"""
    return policy == "spill" and hosted_available and hosted_supports_request
