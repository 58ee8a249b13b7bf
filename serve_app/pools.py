"""The gateway's view of its self-hosted pools: load from the LoadBoard, saturation, breaker, in-flight.

The loop that refreshes it lives in the gateway; this class only turns snapshots into state, so it can be
tested without Ray.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from serve_app import slo
from serve_app.config import BreakerConfig, RouteConfig, SaturationThresholds
from serve_app.routing import (
    BreakerState,
    CircuitBreaker,
    PoolView,
    ReplicaLoad,
    SaturationState,
    ready,
    saturation_score,
)
from serve_app.slo_state import SloBook

Snapshot = dict[str, dict[str, tuple[float, dict[str, Any]]]]


@dataclass
class PoolState:
    thresholds: SaturationThresholds
    breaker: CircuitBreaker
    view: PoolView = field(default_factory=lambda: PoolView(()))
    saturation: SaturationState = field(default_factory=SaturationState)
    inflight: int = 0  # this gateway's requests on the pool now
    spilled: int = 0  # this gateway's requests on Gemini that the pool could not take
    spilled_tokens: int = 0  # completion tokens those requests received (a running total)
    spilled_rate: float = 0.0  # ... per second, smoothed
    spilled_at: tuple[float, int] = (0.0, 0)  # (monotonic time, total) of the last rate update
    refreshed_at: float = 0.0


class PoolMonitor:
    """Per-pool saturation (with hysteresis) and circuit breakers, fed by load snapshots and outcomes."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolState] = {}
        self.slo = SloBook()
        self._slo_routes: dict[str, float] = {}  # pool -> the strictest TTFT SLO of its routes (seconds)

    def configure(self, routes: dict[str, RouteConfig]) -> None:
        """Apply a (new) route table. A pool used by several routes takes the first route's thresholds."""
        wanted: dict[str, tuple[SaturationThresholds, BreakerConfig]] = {}
        self._slo_routes = {}
        for route in routes.values():
            if route.pool is not None and route.pool not in wanted:
                wanted[route.pool] = (route.saturation, route.breaker)
            if route.pool is not None and route.ttft_slo_ms:
                strictest = min(self._slo_routes.get(route.pool, route.ttft_slo_ms), route.ttft_slo_ms)
                self._slo_routes[route.pool] = strictest
        for name, (th, br) in wanted.items():
            state = self.pools.get(name)
            if state is None:
                state = self.pools[name] = PoolState(th, CircuitBreaker(br))
                state.saturation.update(math.inf, th)  # no load seen yet: fail closed
            else:
                state.thresholds = th
                state.breaker.cfg = br

    def update(self, snapshot: Snapshot, now_wall: float | None = None) -> None:
        """Take a LoadBoard snapshot (wall-clock timestamps) and recompute saturation."""
        now_wall = time.time() if now_wall is None else now_wall
        for name, state in self.pools.items():
            replicas = tuple(
                ReplicaLoad(
                    waiting=float(load.get("waiting", 0.0)),
                    running=float(load.get("running", 0.0)),
                    kv_cache_usage=float(load.get("kv_cache_usage", 0.0)),
                    tokens_per_s=float(load.get("tokens_per_s", 0.0)),
                    age_s=max(0.0, now_wall - ts),
                    healthy=bool(load.get("healthy", 1.0)),
                )
                for ts, load in snapshot.get(name, {}).values()
            )
            for _, load in snapshot.get(name, {}).values():
                seqs = load.get("max_num_seqs")
                self.slo.observe_load(
                    name,
                    float(load.get("running", 0.0)),
                    float(load.get("tokens_per_s", 0.0)),
                    int(seqs) if seqs else None,
                )
            state.view = PoolView(replicas, state.inflight)
            state.saturation.update(saturation_score(state.view, state.thresholds), state.thresholds)
            state.refreshed_at = now_wall

    def saturated(self, pool: str) -> bool:
        """Saturated by the last snapshot, or by this gateway's own in-flight count since then."""
        state = self.pools[pool]
        if state.saturation.saturated:
            return True
        th = state.thresholds
        if th.max_inflight_per_replica is None:
            return False
        n = max(1, len(ready(state.view, th)))
        return state.inflight / n / th.max_inflight_per_replica >= th.enter

    def ready_replicas(self, pool: str) -> int:
        """Replicas of the pool that reported recently and are healthy (0: none can take a request)."""
        state = self.pools.get(pool)
        return 0 if state is None else len(ready(state.view, state.thresholds))

    def explain(self, pool: str) -> dict[str, Any]:
        """The inputs of the spill decision, for the request log line."""
        s = self.pools[pool]
        return {
            "score": None if math.isinf(s.saturation.score) else round(s.saturation.score, 3),
            "ready": len(ready(s.view, s.thresholds)),
            "replicas": len(s.view.replicas),
            "waiting": s.view.waiting,
            "inflight": s.inflight,
        }

    def spill_demand(self) -> dict[str, dict[str, float]]:
        """Per pool, what this gateway has on Gemini because the pool could not take it (for autoscaling)."""
        out: dict[str, dict[str, float]] = {}
        now = time.monotonic()
        for name, s in self.pools.items():
            t0, n0 = s.spilled_at
            if t0 > 0 and now > t0:
                rate = (s.spilled_tokens - n0) / (now - t0)
                s.spilled_rate += 0.3 * (rate - s.spilled_rate)
            s.spilled_at = (now, s.spilled_tokens)
            out[name] = {"spilled_ongoing": float(s.spilled), "spilled_tokens_per_s": s.spilled_rate}
            slo_ms = self._slo_routes.get(name)
            if slo_ms:
                p = self.slo.pool(name)
                target = slo.slo_target_ongoing(
                    p.rates(), slo_ms / 1000, p.mean_prompt_tokens or 64.0, p.predictor.correction
                )
                if target is not None:
                    out[name]["slo_target_ongoing"] = target
        return out

    def breaker(self, pool: str) -> CircuitBreaker:
        return self.pools[pool].breaker

    def describe(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """The /admin/pools view."""
        now = time.monotonic() if now is None else now
        out: dict[str, dict[str, Any]] = {}
        for name, s in self.pools.items():
            ages = [r.age_s for r in s.view.replicas]
            out[name] = {
                "replicas": len(s.view.replicas),
                "ready_replicas": len(ready(s.view, s.thresholds)),
                "spilled": s.spilled,
                "waiting": s.view.waiting,
                "running": s.view.running,
                "kv_cache_usage": s.view.kv_cache_usage,
                "tokens_per_s": s.view.tokens_per_s,
                "inflight": s.inflight,
                "saturation_score": None if math.isinf(s.saturation.score) else s.saturation.score,
                "saturated": self.saturated(name),
                "breaker": s.breaker.current(now).name.lower(),
                "max_load_age_s": max(ages) if ages else None,
            }
        return out

    def breaker_states(self, now: float) -> dict[str, BreakerState]:
        return {name: s.breaker.current(now) for name, s in self.pools.items()}
