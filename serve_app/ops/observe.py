"""`serve-app observe`: a local Prometheus scraping Ray's metrics port, for looking at a running app.

`start_prometheus(...)` is the reusable part (the dashboard tests use it): it writes a scrape config into a
work directory, starts the `prometheus` binary (Debian's package: `make prometheus`) with its storage
there, and waits for `/-/ready`. The handle stops exactly the process it started, by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9090
DEFAULT_METRICS_PORT = 8080
DEFAULT_INTERVAL_S = 2.0
DASHBOARD = "configs/grafana/serve_app.json"

EXAMPLE_QUERIES = (
    (
        "TTFT p95 by route",
        "histogram_quantile(0.95, sum by (le, route) (rate(ray_serve_app_ttft_seconds_bucket[1m])))",
    ),
    (
        "ITL p50 by route",
        "histogram_quantile(0.5, sum by (le, route) (rate(ray_serve_app_itl_seconds_bucket[1m])))",
    ),
    ("requests/s by route and outcome", "sum by (route, outcome) (rate(ray_serve_app_requests_total[1m]))"),
    ("output tokens/s", 'sum by (route) (rate(ray_serve_app_tokens_total{kind="completion"}[1m]))'),
    ("pool queue depth", "max by (pool) (ray_serve_app_pool_waiting)"),
)


class PrometheusError(RuntimeError):
    """Prometheus could not be started, or a query failed."""


def find_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusError("no `prometheus` binary on PATH: run `make prometheus` (apt-get install prometheus)")
    return found


def render_config(scrape_port: int, interval_s: float = DEFAULT_INTERVAL_S, host: str = "127.0.0.1") -> str:
    """A Prometheus config with one job scraping Ray's metrics export port (what KubeRay's pods expose)."""
    interval = _duration(interval_s)
    doc: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "ray",
                "scrape_interval": interval,
                # A scrape of a busy Ray node can take a while; the timeout may not exceed the interval.
                "scrape_timeout": interval,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"{host}:{scrape_port}"]}],
            }
        ],
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError("the scrape interval must be positive")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


@dataclass
class PrometheusHandle:
    """A running Prometheus started by `start_prometheus`; `stop()` ends that process only."""

    process: subprocess.Popen[bytes]
    url: str
    workdir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def query(self, expr: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """An instant query through the HTTP API; the `result` list (vector samples or a matrix)."""
        return instant_query(self.url, expr, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("prometheus (pid %d) did not stop within %.0f s; killing it", self.pid, timeout_s)
                self.process.kill()
                self.process.wait(timeout_s)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> PrometheusHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def instant_query(base_url: str, expr: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    resp = httpx.get(f"{base_url}/api/v1/query", params={"query": expr}, timeout=timeout_s)
    try:
        body = resp.json()
    except ValueError:
        raise PrometheusError(f"query failed with HTTP {resp.status_code}: {resp.text[:200]}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"query {expr!r} failed: {body.get('errorType')}: {body.get('error')}")
    result = body["data"]["result"]
    return list(result) if isinstance(result, list) else [result]


def start_prometheus(
    scrape_port: int,
    port: int = DEFAULT_PORT,
    workdir: Path | str | None = None,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    host: str = "127.0.0.1",
    ready_timeout_s: float = 60.0,
) -> PrometheusHandle:
    """Start Prometheus on host:port scraping 127.0.0.1:scrape_port; return once it answers /-/ready.

    The config, the TSDB and the log go into `workdir` (a new temporary directory when None).
    """
    binary = find_binary()
    work = Path(tempfile.mkdtemp(prefix="serve_app_prometheus_")) if workdir is None else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = work / "prometheus.yml"
    config_path.write_text(render_config(scrape_port, interval_s))
    log_path = work / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={host}:{port}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log:
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order.
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    handle = PrometheusHandle(process, f"http://{host}:{port}", work, log_path)
    try:
        _wait_ready(handle, ready_timeout_s)
    except BaseException:
        handle.stop()
        raise
    logger.info("prometheus (pid %d) ready at %s, scraping 127.0.0.1:%d", handle.pid, handle.url, scrape_port)
    return handle


def _wait_ready(handle: PrometheusHandle, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if handle.process.poll() is not None:
            raise PrometheusError(f"prometheus exited with code {handle.process.returncode}:\n{handle.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{handle.url}/-/ready", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise PrometheusError(f"prometheus not ready after {timeout_s:.0f} s:\n{handle.log_tail()}")
        time.sleep(0.2)


# ------------------------------------------------------------------------------------ the CLI
def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _observe(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll is noise here
    if not _port_free(args.port):
        # On a systemd host, Debian's package also starts its own prometheus service on :9090.
        print(f"port {args.port} is already in use (a system prometheus service?): pass --port N")
        return 1
    with contextlib.ExitStack() as stack:
        if args.data_dir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve_app_prometheus_")))
        else:
            workdir = Path(args.data_dir)
        try:
            handle = start_prometheus(args.metrics_port, args.port, workdir, interval_s=args.interval)
        except PrometheusError as err:
            print(err)
            return 1
        stack.callback(handle.stop)
        print(f"Prometheus: {handle.url}  (pid {handle.pid}, scraping http://127.0.0.1:{args.metrics_port}/metrics)")
        print(f"Data: {workdir}  Dashboard for Grafana: {DASHBOARD}  Stop: Ctrl-C\n")
        print("Example PromQL (paste into the Graph tab):")
        for title, expr in EXAMPLE_QUERIES:
            print(f"  # {title}\n  {expr}")
        print(flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            if handle.process.poll() is not None:
                print(f"prometheus exited with code {handle.process.returncode}:\n{handle.log_tail()}")
                return 1
        print("stopping prometheus")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("observe", help="run a local Prometheus that scrapes the running app's Ray metrics")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="Prometheus web/API port (127.0.0.1)")
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, help="Ray's metrics export port")
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="scrape interval, seconds")
    p.add_argument("--data-dir", default=None, help="keep config and TSDB here (default: a temp dir, removed)")
    p.set_defaults(func=_observe)
