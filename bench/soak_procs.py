"""The processes of one local app (bench/soak.py): its own process tree, roles, samples, replica pids."""

from __future__ import annotations

from typing import Any

import psutil


def role_of(proc: psutil.Process) -> str:
    cmd: list[str] = proc.cmdline()
    name: str = proc.name()
    first = cmd[0] if cmd else name
    if first.startswith("ray::"):
        return first[5:].split()[0].split(".")[0].replace("ServeReplica:serve_app:", "")  # no method name
    if name.startswith("VLLM"):
        return name
    joined = " ".join(cmd)
    for key, role in (
        ("gcs_server", "gcs_server"),
        ("raylet", "raylet"),
        ("dashboard/agent.py", "dashboard_agent"),
        ("runtime_env/agent", "runtime_env_agent"),
        ("dashboard.py", "dashboard"),
        ("log_monitor.py", "log_monitor"),
        ("serve-app", "serve-app run (driver)"),
        ("bench.soak", "soak client + Gemini stand-in"),
    ):
        if key in joined:
            return role
    script = next((c for c in cmd[1:] if c.endswith(".py") or c.startswith("from ")), None)
    return f"{name} {script.rsplit('/', 1)[-1][:40]}" if script else name


def app_processes(app_pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(app_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def replica_pids(app_pid: int, pool: str) -> list[int]:
    """This app's live LLMServer replicas of `pool`, sorted by pid.

    Ray's state API (and a deployment handle) would need this cluster's auth token (Ray 2.60 starts the
    local cluster with token auth), which this tool does not read. Instead: the descendants of our own
    `serve-app run` process whose title Ray set to the replica actor's name; nothing outside that tree.
    """
    title = f"ray::ServeReplica:serve_app:LLMServer-{pool}"
    out = []
    for proc in app_processes(app_pid)[1:]:
        try:
            cmd = proc.cmdline()
            if cmd and cmd[0].split(".")[0] == title and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except psutil.Error:
            continue
    return sorted(out)


def process_row(proc: psutil.Process, t: float) -> dict[str, Any] | None:
    try:
        with proc.oneshot():
            ct = proc.cpu_times()
            return {
                "t": t,
                "pid": proc.pid,
                "role": role_of(proc),
                "rss_mb": round(proc.memory_info().rss / 2**20, 2),
                "fds": proc.num_fds(),
                "threads": proc.num_threads(),
                "cpu_s": round(ct.user + ct.system, 1),
            }
    except psutil.Error:
        return None


def own_app_pid(url: str) -> int:
    """The `serve-app run` child of this process serving `url` (bench/localapp.py starts it)."""
    port = url.rsplit(":", 1)[1]
    for child in psutil.Process().children():
        cmd = child.cmdline()
        if "run" in cmd and port in cmd:
            return int(child.pid)
    raise SystemExit(f"no serve-app run child serving {url}")


def leftovers(seen: set[tuple[int, float]]) -> list[dict[str, Any]]:
    """App processes still alive after the app stopped (same pid and start time): stopped by pid."""
    left = []
    for pid, created in seen:
        try:
            proc = psutil.Process(pid)
            if proc.create_time() != created:
                continue
            left.append({"pid": pid, "name": proc.name()})
            proc.terminate()
        except psutil.Error:
            continue
    return left
