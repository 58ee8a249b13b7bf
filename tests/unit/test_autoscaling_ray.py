"""The Ray wrapper of the autoscaling policy against Ray 2.60's real types (contexts, wrapper, pickling)."""

from __future__ import annotations

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
    PolicyState,
    observations_from_raw,
    ray_autoscaling_config,
)
from tests.unit.test_autoscaling import NOW, cfg


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
    # Spilled demand only lags: the highest sample of the window counts, not the mean.
    assert ln is not None and (ln.spilled_ongoing, ln.spilled_tokens_per_s) == (14.0, 300.0)
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
