"""Replica autoscaling for LLMServer pools: a pure decision function and a thin Ray Serve policy around it.

Signals. Every LLMServer replica's `record_autoscaling_stats()` returns the keys named below (WAITING ...
CAPACITY_TOKENS_PER_S). Ray records them on the replica every min(0.2 x look_back, metrics_interval_s)
seconds with the replica's `time.time()`, pushes the series (pruned to `look_back_period_s`) to the
controller every `metrics_interval_s`, and hands them to the policy as `ctx.raw_metrics[key][replica_id]`
(lists of TimeStampedValue). We read the raw series rather than `ctx.aggregated_metrics` because we need
the timestamps: the newest sample's age is how we tell a silent replica from an idle one.

All demand is demand: the gateways also report, through every replica, the pool's requests they sent
to Gemini (`spilled_ongoing`, `spilled_tokens_per_s`: pool-wide, so the max over replicas, not the sum).
Arithmetic (`desired_replicas`):
  queue_depth        ceil((sum(waiting + running) + spilled_ongoing) / target_ongoing_per_replica)
  tokens_per_second  ceil((sum(demand_tokens_per_s) + spilled_tokens_per_s) / (capacity_per_replica x
                     target_utilization)), capacity = the configured value, else learned (see below), else
                     queue_depth arithmetic.
When the gateway publishes a TTFT-SLO target (`slo_target_ongoing`, serve_app.slo), either policy asks
for at least ceil((ongoing + spilled_ongoing) / slo_target_ongoing): the SLO can add replicas, never remove.
The result is clamped to [min_replicas, max_replicas], so a step to N x capacity asks for the replicas it
needs in one decision. Every change is logged as one JSON line (`decision_log_line`) in the controller log.

Live bounds. min/max/initial replicas and the queue target travel in Ray's own autoscaling_config fields
(`target_ongoing_requests` carries target_ongoing_per_replica) and the policy reads them from the context
every tick, so a Serve config edit of those updates the controller in place (Ray 2.60: autoscaling_config
is a NeedsActorReconfigure option, no restart). policy_kwargs carry the rest: Serve hashes a deployment
override's `policy` into the application's code version (deploy_utils.get_app_code_version), so changing
the policy kind, tokens/s targets, delays or stale_after_s restarts the pool's replicas.

Zero replicas. With no running replica there are no replica metrics. In Ray 2.60 the wrapper around a
custom policy (autoscaling_policy._apply_autoscaling_config) first checks `current_num_replicas == 0 and
total_num_requests > 0` and then returns 1 replica without calling us; `total_num_requests` includes
requests queued at any DeploymentHandle, and a handle pushes its queue to the controller at once when the
deployment has zero replicas (router.py wrap_queued_request). So a caller wakes a pool at zero by sending
it any request (the gateway uses the no-op `LLMServer.wake`), and keeps it pending until it is served.
Without queued requests we are called and hold at zero (the same decision is in `desired_replicas` for a
Ray that stops short-cutting).

Learned capacity is the highest `capacity_tokens_per_s` reported by a replica *that had a waiting queue*
at the time, kept in the policy state. Only a saturated replica's throughput is its ceiling; learning
from an unsaturated one would under-estimate capacity and scale up a pool that is merely busy.

Missing data fails safe. A running replica that has not reported yet, or whose newest sample is older
than `stale_after_s`, contributes no load, and while any replica is in that state no scale-down is
decided (the load we cannot see might be what keeps the pool busy). Scale-up stays allowed: the visible
load is a lower bound. No usable metrics at all means hold (still clamped to the bounds).

Delays live here, not in Ray. Since 2.54 Serve wraps every custom policy in its own delay logic
(ray/serve/autoscaling_policy.py `_apply_autoscaling_config` -> `_apply_delay_logic`, applied in
`DeploymentAutoscalingState.register` in 2.60). We give Ray `upscale_delay_s = downscale_delay_s = 0`,
which that code passes straight through (`now - t0 + eps >= 0`), and apply our own delays in the pure
function, so they are table-tested, they interact correctly with the missing-metrics hold, and a Ray
release that stops wrapping policies changes nothing. Ray still applies min/max (capacity adjusted),
scaling factors of 1.0 (identity) and its cold-start path: with 0 replicas and requests queued at a
handle, Ray scales to 1 without calling the policy (that is how scale-from-zero works).

Staleness compares the replica's sample timestamps with the controller's clock (`ctx.current_time`),
so nodes need roughly synchronised clocks (NTP); `stale_after_s` of several seconds absorbs the rest.
The policy state is in-memory controller state: a redeploy of the pool starts learning again.

This module imports nothing from serve_app at run time: Ray cloudpickles it by value into the controller.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from serve_app.config import AutoscalingConfig

logger = logging.getLogger(__name__)
# Decision lines go to Ray Serve's logger: inside the controller that is the one with a handler (its log).
_decision_logger = logging.getLogger("ray.serve")

# Keys of LLMServer.record_autoscaling_stats() (all floats).
WAITING = "waiting"  # requests in the engine scheduler's waiting queue
RUNNING = "running"  # sequences the engine is decoding
KV_CACHE_USAGE = "kv_cache_usage"  # 0..1
TOKENS_PER_S = "tokens_per_s"  # generated tokens/s over the last few seconds
DEMAND_TOKENS_PER_S = "demand_tokens_per_s"  # tokens/s the replica would generate with room for all
CAPACITY_TOKENS_PER_S = "capacity_tokens_per_s"  # highest tokens/s seen over a window; 0 until known
# Pool-wide (the same value on every replica; the policy takes the max, never the sum): demand the
# gateways currently send to Gemini because the pool was saturated, degraded or at zero.
SPILLED_ONGOING = "spilled_ongoing"  # spilled requests in flight
SPILLED_TOKENS_PER_S = "spilled_tokens_per_s"  # tokens/s those spilled requests generate
REQUIRED_STAT_KEYS = (WAITING, RUNNING, KV_CACHE_USAGE, TOKENS_PER_S, DEMAND_TOKENS_PER_S, CAPACITY_TOKENS_PER_S)
# Pool-wide too (min over replicas): in-flight requests per replica at which a mean request still meets
# the route's TTFT SLO (serve_app.slo.slo_target_ongoing); 0 = no SLO. The policy never plans for more.
SLO_TARGET_ONGOING = "slo_target_ongoing"
SPILL_STAT_KEYS = (SPILLED_ONGOING, SPILLED_TOKENS_PER_S, SLO_TARGET_ONGOING)  # optional (older replicas)
STAT_KEYS = REQUIRED_STAT_KEYS + SPILL_STAT_KEYS  # everything a current replica reports

POLICY_PATH = "serve_app.autoscaling:LoadPolicy"
STATE_KEY = "serve_app"  # our entry in Ray's policy_state (Ray keeps its own keys beside it)
# Ray's look-back window, in metrics intervals: short so decisions follow load within seconds (the
# delays do the damping), long enough to hold a few samples to average.
LOOK_BACK_INTERVALS = 3.0
_CEIL_EPS = 1e-6  # 16.000000001 sequences / 8 per replica is 2 replicas, not 3


class PolicySettings(Protocol):
    """What the decision reads; serve_app.config.AutoscalingConfig and PolicyParams both fit."""

    @property
    def policy(self) -> str: ...
    @property
    def min_replicas(self) -> int: ...
    @property
    def max_replicas(self) -> int: ...
    @property
    def target_ongoing_per_replica(self) -> float: ...
    @property
    def target_tokens_per_second_per_replica(self) -> float | None: ...
    @property
    def target_utilization(self) -> float: ...
    @property
    def upscale_delay_s(self) -> float: ...
    @property
    def downscale_delay_s(self) -> float: ...
    @property
    def stale_after_s(self) -> float: ...


@dataclass(frozen=True)
class PolicyParams:
    """A self-contained copy of the AutoscalingConfig fields the decision needs (built in the controller)."""

    policy: str = "queue_depth"
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_per_replica: float = 8.0
    target_tokens_per_second_per_replica: float | None = None
    target_utilization: float = 0.8
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0
    stale_after_s: float = 10.0

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> PolicyParams:
        """From `AutoscalingConfig.model_dump()`; fields the decision does not use are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names})


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica's recent load; `timestamp` is when its oldest-updated stat was last sampled."""

    timestamp: float
    waiting: float = 0.0
    running: float = 0.0
    kv_cache_usage: float = 0.0
    tokens_per_s: float = 0.0
    demand_tokens_per_s: float = 0.0
    capacity_tokens_per_s: float = 0.0
    spilled_ongoing: float = 0.0  # pool-wide, as this replica last heard it
    spilled_tokens_per_s: float = 0.0  # pool-wide
    slo_target_ongoing: float = 0.0  # pool-wide; 0 = none


@dataclass(frozen=True)
class PolicyState:
    """What the decision remembers between ticks."""

    up_since: float | None = None  # when the current wish to scale up started
    down_since: float | None = None  # when the current wish to scale down started
    learned_capacity_tokens_per_s: float = 0.0  # per replica, from saturated replicas only
    reason: str = ""  # why the last decision came out as it did (for logs)
    inputs: dict[str, float] = field(default_factory=dict)  # the numbers behind `reason` (for logs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> PolicyState:
        if not isinstance(data, Mapping):
            return cls()
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError:
            return cls()


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - _CEIL_EPS))


def _clamp(n: int, cfg: PolicySettings) -> int:
    return max(cfg.min_replicas, min(cfg.max_replicas, n))


def _load_desire(
    cfg: PolicySettings, fresh: Sequence[ReplicaLoad], learned: float
) -> tuple[int, str, dict[str, float]]:
    """Replicas the visible load asks for (unclamped), a short explanation and its inputs.

    Spilled demand is pool-wide (every replica reports the same gateway-side figure), so it is the max
    over replicas, added once to the pool's own demand. A TTFT-SLO target (pool-wide, the min over
    replicas) can only ask for more replicas than the configured arithmetic, never fewer.
    """
    ongoing = sum(o.waiting + o.running for o in fresh)
    spilled = max(o.spilled_ongoing for o in fresh)
    demand = ongoing + spilled
    inputs = {"replicas_fresh": float(len(fresh)), "ongoing": ongoing, "spilled_ongoing": spilled}
    target = cfg.target_ongoing_per_replica
    wanted = _ceil(demand / target)
    why = f"ongoing {ongoing:.1f} + spilled {spilled:.1f} / target {target:g} per replica"
    if cfg.policy == "tokens_per_second":
        capacity = cfg.target_tokens_per_second_per_replica or learned
        if capacity <= 0:
            why = f"capacity not learned yet; {why}"
        else:
            tps = sum(o.demand_tokens_per_s for o in fresh)
            spilled_tps = max(o.spilled_tokens_per_s for o in fresh)
            inputs.update(demand_tokens_per_s=tps, spilled_tokens_per_s=spilled_tps, capacity_tokens_per_s=capacity)
            source = "configured" if cfg.target_tokens_per_second_per_replica else "learned"
            wanted = _ceil((tps + spilled_tps) / (capacity * cfg.target_utilization))
            why = (
                f"demand {tps:.1f} + spilled {spilled_tps:.1f} tok/s / ({source} capacity {capacity:.1f} x "
                f"{cfg.target_utilization:g})"
            )
    slo_targets = [o.slo_target_ongoing for o in fresh if o.slo_target_ongoing > 0]
    if slo_targets:
        slo = min(slo_targets)
        inputs["slo_target_ongoing"] = slo
        slo_wanted = _ceil(demand / slo)
        if slo_wanted > wanted:
            wanted, why = slo_wanted, f"ongoing {ongoing:.1f} + spilled {spilled:.1f} / TTFT-SLO target {slo:g}"
    return wanted, why, inputs


def desired_replicas(
    cfg: PolicySettings,
    observations: Mapping[str, ReplicaLoad | None],
    current_replicas: int,
    state: PolicyState,
    now: float,
    queued_at_handles: float = 0.0,
) -> tuple[int, PolicyState]:
    """Decide the replica target.

    `observations` has one entry per running replica (None: it has not reported). `current_replicas` is
    the present target. `queued_at_handles` is what Ray counts as queued at the callers' handles (the
    gateway's `wake()` calls while the pool is at zero). Returns the new target and the state to pass in
    on the next call.
    """
    fresh = [o for o in observations.values() if o is not None and now - o.timestamp <= cfg.stale_after_s]
    blind = len(observations) - len(fresh)  # running replicas we cannot see
    learned = max(
        [state.learned_capacity_tokens_per_s]
        + [o.capacity_tokens_per_s for o in fresh if o.waiting > 0 and math.isfinite(o.capacity_tokens_per_s)]
    )
    base = _clamp(current_replicas, cfg)  # bounds are hard limits, never delayed
    if not fresh:
        if not observations and base == 0 and queued_at_handles > 0:
            # Ray 2.60 takes its own cold-start path before calling us in this case; this is the same
            # decision for a Ray that does not.
            return _clamp(1, cfg), PolicyState(None, None, learned, "wake: requests queued at zero replicas")
        why = "no metrics" if not observations else f"no fresh metrics from {blind} replica(s)"
        return base, PolicyState(None, None, learned, f"hold: {why}")

    wanted, why, inputs = _load_desire(cfg, fresh, learned)
    inputs["replicas_blind"] = float(blind)
    target = _clamp(wanted, cfg)
    if target > base:
        # The wish started when the replicas reported it, not at this tick (Ray pushes reports every
        # metrics interval: up to that much of the delay would otherwise be lost).
        reported = max(o.timestamp for o in fresh)
        up_since = state.up_since if state.up_since is not None else min(now, reported)
        if now - up_since >= cfg.upscale_delay_s:
            # The timer stays: demand that still asks for more on the next tick has already persisted
            # for the delay (a step that arrives in two reports must not wait a second full delay).
            return target, PolicyState(up_since, None, learned, f"up {base}->{target}: {why}", inputs)
        return base, PolicyState(up_since, None, learned, f"up to {target} pending: {why}", inputs)
    if target < base:
        if blind:
            reason = f"hold: {blind} replica(s) without fresh metrics"
            return base, PolicyState(None, None, learned, reason, inputs)
        down_since = state.down_since if state.down_since is not None else now
        if now - down_since >= cfg.downscale_delay_s:
            if target == 0 and base > 1:
                # Ray only goes to zero from one replica; keep the timer so 1 -> 0 follows on the next
                # tick instead of waiting a second full delay.
                return 1, PolicyState(None, down_since, learned, f"down {base}->1 (then 0): {why}", inputs)
            return target, PolicyState(None, None, learned, f"down {base}->{target}: {why}", inputs)
        return base, PolicyState(None, down_since, learned, f"down to {target} pending: {why}", inputs)
    return base, PolicyState(None, None, learned, f"steady: {why}", inputs)


# ------------------------------------------------------------------------------------------ Ray side
_PEAK_KEYS = frozenset({CAPACITY_TOKENS_PER_S, SPILLED_ONGOING, SPILLED_TOKENS_PER_S})


def _series_stats(series: Any, peak: bool) -> tuple[float, float] | None:
    """(newest timestamp, mean or max value) of a Ray TimeSeries; None when it is empty."""
    if not series:
        return None
    values = [float(p.value) for p in series]
    newest = max(float(p.timestamp) for p in series)
    return newest, (max(values) if peak else sum(values) / len(values))


def observations_from_raw(
    raw: Mapping[str, Mapping[Any, Any]] | None, replicas: Sequence[Any]
) -> dict[str, ReplicaLoad | None]:
    """Per running replica, its ReplicaLoad from Ray's raw metric series.

    None if a required stat is absent. The spill stats are optional (a replica of an older version does
    not report them: 0); when present they count towards the replica's age like any other stat.
    """
    out: dict[str, ReplicaLoad | None] = {}
    raw = raw or {}
    for rid in replicas:
        values: dict[str, float] = {}
        oldest = math.inf
        for key in STAT_KEYS:
            # Capacity is a peak; spilled demand is a level that only ever lags: take the highest
            # sample of the look-back window, not its mean.
            got = _series_stats(raw.get(key, {}).get(rid), peak=key in _PEAK_KEYS)
            if got is None:
                if key in REQUIRED_STAT_KEYS:
                    break
                continue
            oldest = min(oldest, got[0])
            values[key] = got[1]
        name = str(getattr(rid, "unique_id", rid))
        complete = all(k in values for k in REQUIRED_STAT_KEYS)
        out[name] = ReplicaLoad(timestamp=oldest, **values) if complete else None
    return out


def _live_params(params: PolicyParams, ctx: Any) -> PolicyParams:
    """The bounds and the queue target from Ray's own config fields (updated without a restart)."""
    cfg = getattr(ctx, "config", None)
    target = getattr(cfg, "target_ongoing_requests", None) or params.target_ongoing_per_replica
    lo = getattr(ctx, "capacity_adjusted_min_replicas", None)
    hi = getattr(ctx, "capacity_adjusted_max_replicas", None)
    return replace(
        params,
        min_replicas=params.min_replicas if lo is None else int(lo),
        max_replicas=params.max_replicas if hi is None else int(hi),
        target_ongoing_per_replica=float(target),
    )


def decision_log_line(deployment: str, before: int, after: int, params: PolicyParams, state: PolicyState) -> str:
    """One JSON object per scale decision (the controller log's explanation of the change)."""
    return json.dumps(
        {
            "event": "serve_app.autoscaling.decision",
            "deployment": deployment,
            "from": before,
            "to": after,
            "reason": state.reason,
            "inputs": {
                **state.inputs,
                "policy": params.policy,
                "min_replicas": params.min_replicas,
                "max_replicas": params.max_replicas,
                "target_ongoing_per_replica": params.target_ongoing_per_replica,
                "learned_capacity_tokens_per_s": state.learned_capacity_tokens_per_s,
            },
        },
        sort_keys=True,
    )


class LoadPolicy:
    """The Ray Serve custom policy (`policy_function: serve_app.autoscaling:LoadPolicy`).

    Ray instantiates the class once per (re)registration with `policy_kwargs` (see
    `ray_autoscaling_config`) and calls it with an AutoscalingContext every control-loop tick (0.1 s),
    so the call only reshapes data.
    """

    def __init__(self, **policy_kwargs: Any) -> None:
        self._params = PolicyParams.from_kwargs(policy_kwargs)
        # Ray may clamp our decision (target_capacity), so the same "change" can repeat every tick.
        self._last_logged: tuple[int, int] | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        params = _live_params(self._params, ctx)
        observations = observations_from_raw(ctx.raw_metrics, ctx.running_replicas)
        previous = ctx.policy_state.get(STATE_KEY)
        queued = float(getattr(ctx, "total_num_requests", 0.0) or 0.0) if not observations else 0.0
        decision, state = desired_replicas(
            params, observations, ctx.target_num_replicas, PolicyState.from_dict(previous), now, queued
        )
        change = (ctx.target_num_replicas, decision)
        if decision != ctx.target_num_replicas and change != self._last_logged:
            self._last_logged = change
            _decision_logger.info(
                "%s", decision_log_line(ctx.deployment_name, ctx.target_num_replicas, decision, params, state)
            )
        return decision, {STATE_KEY: state.to_dict()}


def look_back_period_s(cfg: AutoscalingConfig) -> float:
    return LOOK_BACK_INTERVALS * cfg.metrics_interval_s


# What changes through Ray's own autoscaling_config fields (no restart) rather than policy_kwargs (Serve
# hashes a deployment override's `policy` into the application's code version: a change restarts every
# replica, ray/serve/_private/deploy_utils.py get_app_code_version).
LIVE_FIELDS = frozenset({"min_replicas", "max_replicas", "initial_replicas", "target_ongoing_per_replica"})


def ray_autoscaling_config(cfg: AutoscalingConfig) -> dict[str, Any]:
    """The `autoscaling_config` dict for one LLMServer pool (deployment options or a Serve config override).

    Bounds and the queue target go into Ray's fields, which Serve updates in place; policy_kwargs carry
    only the rest (policy kind, tokens/s targets, delays, staleness).
    """
    out: dict[str, Any] = {
        "min_replicas": cfg.min_replicas,
        "max_replicas": cfg.max_replicas,
        "target_ongoing_requests": cfg.target_ongoing_per_replica,
        "metrics_interval_s": cfg.metrics_interval_s,
        "look_back_period_s": look_back_period_s(cfg),
        # Our policy applies the delays itself (see the module docstring); Ray's must not add to them.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "downscale_to_zero_delay_s": 0.0,
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": cfg.model_dump(mode="json", exclude=set(LIVE_FIELDS | {"metrics_interval_s"})),
        },
    }
    if cfg.initial_replicas is not None:
        out["initial_replicas"] = cfg.initial_replicas
    return out
