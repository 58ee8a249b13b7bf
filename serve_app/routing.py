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
    healthy: bool = True  # the replica's engine is alive and making progress


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
    """max(waiting/replica ÷ limit, KV use ÷ limit, in-flight/replica ÷ limit) over the ready replicas.

    A score of 1.0 means "at the limit". Only fresh, healthy replicas are scored: a replica that stopped
    reporting (killed, restarting) or whose engine is dead takes no traffic, so it neither adds capacity
    nor makes the pool look saturated. Fail closed only when no replica is ready.
    """
    fresh = ready(view, th)
    if not fresh:
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


def ready(view: PoolView, th: SaturationThresholds) -> list[ReplicaLoad]:
    """The replicas that can take a request now: reported recently and healthy."""
    return [r for r in view.replicas if r.age_s <= th.stale_after_s and r.healthy]


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
class Ticket:
    """One admitted use of the pool. Settled exactly once: ok, failed, or neutral (released)."""

    probe: bool
    at: float
    settled: bool = False


@dataclass(slots=True)
class CircuitBreaker:
    """Opens on consecutive failures or an error rate over a window; half-open probes close it again.

    Only the pool's own health reaches it: a request is admitted with a Ticket and the ticket is settled
    once — ok (the pool served it), failed (the pool failed it) or neutral (the client left, the pool was
    never really used). A probe slot is held only by an admitted ticket and freed on every settle, or when
    the probe has been out longer than `probe_timeout_s` (so half-open can never stick).
    """

    cfg: BreakerConfig
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    consecutive_failures: int = 0
    probes: list[Ticket] = field(default_factory=list)
    probe_successes: int = 0
    window: deque[tuple[float, bool]] = field(default_factory=deque)

    def _trim(self, now: float) -> None:
        while self.window and now - self.window[0][0] > self.cfg.window_s:
            self.window.popleft()

    def current(self, now: float) -> BreakerState:
        if self.state is BreakerState.OPEN and now - self.opened_at >= self.cfg.open_s:
            self.state = BreakerState.HALF_OPEN
            self.probes.clear()
            self.probe_successes = 0
        if self.probes:
            self.probes = [t for t in self.probes if not t.settled and now - t.at < self.cfg.probe_timeout_s]
        return self.state

    @property
    def probes_in_flight(self) -> int:
        return len(self.probes)

    def would_allow(self, now: float) -> bool:
        """Would a request be admitted now? Takes nothing: call admit() when the pool is really used."""
        state = self.current(now)
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and len(self.probes) < self.cfg.half_open_probes
        )

    def admit(self, now: float) -> Ticket | None:
        """Admit one use of the pool (None: not now). In half-open, a few probes at a time."""
        if not self.would_allow(now):
            return None
        ticket = Ticket(probe=self.state is BreakerState.HALF_OPEN, at=now)
        if ticket.probe:
            self.probes.append(ticket)
        return ticket

    def allow(self, now: float) -> bool:
        """admit() for callers that settle through record(); kept for the table tests."""
        return self.admit(now) is not None

    def settle(self, ticket: Ticket, now: float, ok: bool | None) -> None:
        """The outcome of an admitted use; a second settle of the same ticket does nothing."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket in self.probes:
            self.probes.remove(ticket)
        if ok is not None:
            self._outcome(now, ok, ticket.probe)

    def record(self, now: float, ok: bool) -> None:
        """An outcome without a ticket (a probe slot, if one is held, is given back)."""
        self.current(now)
        probe = self.state is BreakerState.HALF_OPEN and bool(self.probes)
        if probe:
            self.probes.pop(0)
        self._outcome(now, ok, probe)

    def _outcome(self, now: float, ok: bool, probe: bool) -> None:
        self._trim(now)
        self.window.append((now, ok))
        state = self.current(now)
        if state is BreakerState.HALF_OPEN:
            if not ok:
                self._open(now)
                return
            if probe:
                self.probe_successes += 1
            if self.probe_successes >= self.cfg.half_open_probes:
                self.state = BreakerState.CLOSED
                self.consecutive_failures = 0
                self.window.clear()
            return
        if state is BreakerState.OPEN:
            return  # stragglers admitted before it opened say nothing new
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1
        if not ok and self._should_open():
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
        self.probes.clear()
        self.probe_successes = 0


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
