"""Start `serve-app run` in a child process for the demos and traces, and stop it by its own pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from serve_app.testing.gemini_standin import running_standin

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve-app run exited with {proc.returncode}")
        try:
            pools = httpx.get(f"{url}/admin/pools", timeout=2).json()["pools"]
            if pools and all(p["replicas"] >= 1 for p in pools.values()):
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(1)
    raise SystemExit("the app did not become ready in time")


@contextlib.contextmanager
def running_app(config: Path, env: dict[str, str], timeout: float = 600) -> Iterator[str]:
    """Yield the base URL of a local app serving `config`, once every pool has a replica reporting."""
    port, metrics_port = free_port(), free_port()
    cmd = [
        str(BIN / "serve-app"),
        "run",
        "--config",
        str(config),
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
    ]
    app = subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, app, timeout)
        yield url
    finally:
        app.send_signal(signal.SIGINT)
        try:
            app.wait(timeout=60)
        except subprocess.TimeoutExpired:
            app.kill()


@contextlib.contextmanager
def running_app_with_standin(config: Path) -> Iterator[str]:
    """`running_app` with GEMINI_API_KEY / GEMINI_BASE_URL pointing at a Gemini stand-in with realistic
    latency (300 ms to the first token, 100 tokens/s)."""
    with running_standin(api_key="demo-key", latency_ms=300, tokens_per_second=100) as standin:
        env = {"GEMINI_API_KEY": "demo-key", "GEMINI_BASE_URL": standin.base_url}
        with running_app(config, env) as url:
            yield url
