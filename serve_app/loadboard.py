"""Where replicas publish their load and gateways read it: one small named Ray actor per application.

Every LLMServer replica pushes its load about twice a second; every gateway replica pulls the whole board
on its own schedule and pushes the demand it spilled to Gemini. Entries carry the time they were written,
so a reader can tell stale load (a replica that stopped reporting) from idle load. A replica killed with
SIGKILL never says goodbye, so the board also reconciles: an entry whose replica actor is gone is dropped
within a few seconds instead of lingering until it ages out. The actor holds no engine and reserves no CPU.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray

NAMESPACE = "serve_app"
SERVE_NAMESPACE = "serve"
_FORGET_AFTER_S = 60.0  # entries this old belong to replicas that are gone
_RECONCILE_EVERY_S = 2.0
_DEMAND_FRESH_S = 5.0
_MIN_KEYS = frozenset({"slo_target_ongoing"})  # a gateway's spilled demand older than this no longer counts


class LoadBoard:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
        self._actors: dict[tuple[str, str], str] = {}  # (pool, replica) -> Serve replica actor name
        self._demand: dict[str, tuple[float, dict[str, dict[str, float]]]] = {}  # gateway -> (ts, per pool)
        self._reconciled = 0.0

    def report(self, pool: str, replica: str, load: dict[str, Any], actor_name: str = "") -> dict[str, float]:
        """Store a replica's load; answer with the pool's spilled demand (summed over gateways)."""
        self._entries.setdefault(pool, {})[replica] = (time.time(), load)
        if actor_name:
            self._actors[(pool, replica)] = actor_name
        return self.spill_demand(pool)

    def remove(self, pool: str, replica: str) -> None:
        self._entries.get(pool, {}).pop(replica, None)
        self._actors.pop((pool, replica), None)

    def report_demand(self, gateway: str, demand: dict[str, dict[str, float]]) -> None:
        self._demand[gateway] = (time.time(), demand)

    def spill_demand(self, pool: str) -> dict[str, float]:
        now = time.time()
        total: dict[str, float] = {}
        for ts, per_pool in self._demand.values():
            if now - ts > _DEMAND_FRESH_S:
                continue
            for key, value in per_pool.get(pool, {}).items():
                if key in _MIN_KEYS:  # a target: the strictest gateway wins
                    total[key] = min(total.get(key, float(value)), float(value))
                else:
                    total[key] = total.get(key, 0.0) + float(value)
        return total

    def pid(self) -> int:
        """The actor's process id (operators and chaos tests)."""
        return os.getpid()

    def snapshot(self) -> dict[str, dict[str, tuple[float, dict[str, Any]]]]:
        now = time.time()
        for pool, replicas in self._entries.items():
            for rid in [r for r, (ts, _) in replicas.items() if now - ts > _FORGET_AFTER_S]:
                self.remove(pool, rid)
        if now - self._reconciled >= _RECONCILE_EVERY_S:
            self._reconciled = now
            self._reconcile()
        return self._entries

    def _reconcile(self) -> None:
        """Drop entries whose replica actor no longer exists (SIGKILLed replicas never call remove)."""
        for (pool, replica), name in list(self._actors.items()):
            try:
                ray.get_actor(name, namespace=SERVE_NAMESPACE)
            except ValueError:  # no such (live) actor
                self.remove(pool, replica)
            except Exception:  # GCS hiccup: keep the entry, staleness still applies
                continue


def board_name(app_name: str) -> str:
    return f"loadboard-{app_name or 'default'}"


def get_board(app_name: str) -> Any:
    """The application's board actor, created by whoever asks first."""
    # No task events: the board takes several calls a second for the app's whole life, and Ray's GCS keeps
    # an event record per call (~3 KB each, up to 100,000): the soak saw gcs_server grow 100 MB an hour.
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1, enable_task_events=False)(LoadBoard)  # type: ignore[call-overload]  # a valid actor option (ray_option_utils) that the stub omits
    return actor_cls.options(
        name=board_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
