"""Where replicas publish their load and gateways read it: one small named Ray actor per application.

Every LLMServer replica pushes its EngineLoad about twice a second; every gateway replica pulls the whole
board on its own schedule. Entries carry the time they were written, so a reader can tell stale load
(a replica that stopped reporting) from idle load. The actor holds no engine and uses no CPU reservation.
"""

from __future__ import annotations

import time
from typing import Any

import ray

NAMESPACE = "serve_app"
_FORGET_AFTER_S = 60.0  # entries this old belong to replicas that are gone


class LoadBoard:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}

    def report(self, pool: str, replica: str, load: dict[str, Any]) -> None:
        self._entries.setdefault(pool, {})[replica] = (time.time(), load)

    def remove(self, pool: str, replica: str) -> None:
        self._entries.get(pool, {}).pop(replica, None)

    def snapshot(self) -> dict[str, dict[str, tuple[float, dict[str, Any]]]]:
        now = time.time()
        for replicas in self._entries.values():
            for rid in [r for r, (ts, _) in replicas.items() if now - ts > _FORGET_AFTER_S]:
                del replicas[rid]
        return self._entries


def board_name(app_name: str) -> str:
    return f"loadboard-{app_name or 'default'}"


def get_board(app_name: str) -> Any:
    """The application's board actor, created by whoever asks first."""
    actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(LoadBoard)
    return actor_cls.options(
        name=board_name(app_name), namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
