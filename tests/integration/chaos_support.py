"""Helpers for the chaos suites: streaming client, pool view, Ray process lookup (no fixtures here)."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import httpx

from tests.support import wait_for


def stream(
    url: str,
    body: dict[str, Any],
    timeout: float = 60,
    abort_after: int | None = None,
    progress: list[int] | None = None,
) -> dict[str, Any]:
    """POST a streaming request; collect data events (or close after `abort_after` of them).

    `progress`, when given, gets one element appended per data event (a thread-safe count for a test
    that must act while the stream is still running)."""
    started = time.monotonic()
    events: list[str] = []
    comments: list[str] = []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=timeout) as r:
        status, headers = r.status_code, dict(r.headers)
        if status != 200:
            r.read()
            return {"status": status, "headers": headers, "body": r.json(), "events": [], "seconds": 0.0}
        for line in r.iter_lines():
            if line.startswith(":"):
                comments.append(line)
            elif line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if progress is not None:
                    progress.append(1)
                if abort_after is not None and len(events) >= abort_after:
                    break
    return {
        "status": status,
        "headers": headers,
        "events": events,
        "comments": comments,
        "seconds": time.monotonic() - started,
    }


def payloads(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(e) for e in result["events"] if e != "[DONE]"]


def errors(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in payloads(result) if "error" in p]


def text(result: dict[str, Any]) -> str:
    out = []
    for p in payloads(result):
        for c in p.get("choices") or []:
            delta = c.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else c.get("text")
            out.append(piece or "")
    return "".join(out)


def ids(result: dict[str, Any]) -> set[str]:
    return {p["id"] for p in payloads(result) if "id" in p}


def usage(result: dict[str, Any]) -> dict[str, Any] | None:
    found = [p["usage"] for p in payloads(result) if p.get("usage")]
    return found[-1] if found else None


def admin(root: str) -> dict[str, Any]:
    view: dict[str, Any] = httpx.get(f"{root}/admin/pools", timeout=10).json()
    return view


def settled(root: str, pool: str) -> dict[str, Any]:
    """Wait until the gateway holds no request (no gauge drift) and return the admin view."""

    def check() -> dict[str, Any] | None:
        view = admin(root)
        quiet = view["open_requests"] == 0 and all(v == 0 for v in view["inflight"].values())
        return view if quiet and view["pools"][pool]["inflight"] == 0 else None

    result: dict[str, Any] = wait_for(check, timeout=30, what="no open requests in the gateway")
    return result


def replica_stats(app: str, deployment: str, want: int, timeout: float = 180) -> dict[str, dict[str, Any]]:
    """stats() of `want` distinct running replicas (polled through the handle until all answered)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(seen)} of {want} replicas of {deployment} answered")
        try:
            st = handle.stats.remote().result(timeout_s=30)
            seen[st["replica_id"]] = st
        except Exception:
            time.sleep(0.5)
    return seen


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def board_pid(app: str) -> int:
    import ray

    from serve_app.loadboard import NAMESPACE, board_name

    board = ray.get_actor(board_name(app), namespace=NAMESPACE)
    return int(ray.get(board.pid.remote(), timeout=10))
