"""Helpers shared by the test suites (no fixtures here: see conftest.py files)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; return its value. Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def sim_pool(**overrides: Any) -> dict[str, Any]:
    """A simulated pool config (the test double), fast by default."""
    pool: dict[str, Any] = {
        "engine": "simulated",
        "model": "sim-model",
        "simulated": {"max_num_seqs": 8, "tokens_per_second": 200.0, "first_token_delay_s": 0.02},
        "deployment": {"num_replicas": 1, "num_cpus": 0.1, "max_ongoing_requests": 64, "max_queued_requests": 64},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(pool.get(key), dict):
            pool[key] = {**pool[key], **value}
        else:
            pool[key] = value
    return pool


def assert_not_in_ray_logs(secret: str) -> None:
    """Fail if `secret` appears in any log file of the running local Ray session (all replicas' logs)."""
    import glob
    import os

    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    files = [p for p in glob.glob(os.path.join(logs, "**", "*"), recursive=True) if os.path.isfile(p)]
    assert files, f"no Ray log files under {logs}"
    for path in files:
        with open(path, "rb") as f:
            assert secret.encode() not in f.read(), path
