"""`serve-app observe` and start_prometheus: config generation and a real Prometheus scraping a target."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serve_app.cli import build_parser
from serve_app.ops.observe import render_config, start_prometheus
from tests.observability import ROOT
from tests.support import free_port, wait_for


@pytest.mark.parametrize(
    ("interval", "expected"),
    [(1.0, "1s"), (2, "2s"), (0.5, "500ms"), (15.0, "15s"), (1.25, "1250ms")],
)
def test_render_config_interval(interval: float, expected: str) -> None:
    doc = yaml.safe_load(render_config(9999, interval))
    job = doc["scrape_configs"][0]
    assert job["scrape_interval"] == expected == doc["global"]["scrape_interval"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:9999"]}]


def test_checked_in_config_matches_what_observe_generates(tmp_path: Path) -> None:
    checked_in = ROOT / "configs" / "prometheus" / "prometheus.yml"
    assert yaml.safe_load(checked_in.read_text()) == yaml.safe_load(render_config(8080, 2.0))
    generated = tmp_path / "p.yml"
    generated.write_text(render_config(8080, 2.0))
    for path in (checked_in, generated):
        proc = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cli_registers_observe() -> None:
    args = build_parser().parse_args(["observe", "--port", "19090", "--metrics-port", "18080", "--interval", "1"])
    assert (args.command, args.port, args.metrics_port, args.interval) == ("observe", 19090, 18080, 1.0)


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"# TYPE demo_requests_total counter\ndemo_requests_total 42\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def metrics_target() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_start_prometheus_scrapes_and_stops(metrics_target: int, tmp_path: Path) -> None:
    handle = start_prometheus(metrics_target, free_port(), tmp_path, interval_s=0.5)
    try:
        assert (tmp_path / "prometheus.yml").exists()
        result = wait_for(lambda: handle.query("demo_requests_total"), timeout=30, what="the first scrape")
        assert float(result[0]["value"][1]) == 42
        assert result[0]["metric"]["job"] == "ray"
    finally:
        handle.stop()
    assert handle.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(handle.pid, 0)
