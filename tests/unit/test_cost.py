"""Cost report: metric parsing, prices, break-even arithmetic, recommendation, CLI (file and Prometheus)."""

from __future__ import annotations

import json
import math
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from serve_app.cli import main
from serve_app.ops.cost import (
    REPLICAS_METRIC,
    REQUESTS_METRIC,
    TOKENS_METRIC,
    CostError,
    CostInputs,
    HostedPrice,
    TokenUsage,
    break_even,
    compute_report,
    gpu_hourly_usd,
    hosted_price,
    load_price_table,
    pool_replicas,
    recommend,
    request_counts,
    token_usage,
)
from serve_app.ops.cost_cli import parse_window
from serve_app.ops.promtext import parse_samples

SNAPSHOT = f"""\
# HELP {TOKENS_METRIC} Tokens served.
# TYPE {TOKENS_METRIC} counter
{TOKENS_METRIC}{{model="chat",route="self_hosted",kind="prompt",WorkerId="a"}} 20000000
{TOKENS_METRIC}{{model="chat",route="self_hosted",kind="prompt",WorkerId="b"}} 10000000
{TOKENS_METRIC}{{model="chat",route="self_hosted",kind="completion",WorkerId="a"}} 10000000
{TOKENS_METRIC}{{model="chat",route="gemini",kind="prompt"}} 3000000
{TOKENS_METRIC}{{model="chat",route="gemini",kind="completion"}} 1000000
# TYPE {REQUESTS_METRIC} counter
{REQUESTS_METRIC}{{model="chat",route="self_hosted",outcome="ok"}} 40000
{REQUESTS_METRIC}{{model="chat",route="gemini",outcome="ok"}} 4000
# TYPE {REPLICAS_METRIC} gauge
{REPLICAS_METRIC}{{pool="llama",WorkerId="a"}} 2
{REPLICAS_METRIC}{{pool="llama",WorkerId="b"}} 2
{REPLICAS_METRIC}{{pool="small",WorkerId="a"}} 1
# TYPE other_total counter
other_total 5
"""
FLASH = HostedPrice("gemini-2.5-flash", 0.30, 2.50, "2026-03")


@pytest.mark.parametrize(
    ("text", "seconds"), [("1h", 3600), ("30m", 1800), ("1h30m", 5400), ("2d", 172800), ("90s", 90)]
)
def test_parse_window(text: str, seconds: float) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "1", "h", "1.5h", "-1h", "0s", "1 h"])
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(CostError):
        parse_window(text)


def test_snapshot_parsing_sums_series_by_model_route_kind() -> None:
    samples = parse_samples(SNAPSHOT)
    assert token_usage(samples) == [
        TokenUsage("chat", "gemini", 3e6, 1e6),
        TokenUsage("chat", "self_hosted", 30e6, 10e6),
    ]
    assert {"model": "chat", "route": "gemini", "outcome": "ok", "count": 4000.0} in request_counts(samples)
    assert pool_replicas(samples) == 3  # llama (reported twice) counts once, plus small


def test_bundled_price_table_is_dated_and_has_flash() -> None:
    table = load_price_table()
    assert table["as_of"] and table["source"]
    assert hosted_price(table, "gemini-2.5-flash") == HostedPrice("gemini-2.5-flash", 0.30, 2.50, table["as_of"])


def test_price_file_override_and_unknown_model(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps({"as_of": "2030-01", "models": {"g": {"input_per_million": 1, "output_per_million": 4}}})
    )
    assert hosted_price(load_price_table(str(path)), "g").cost(1e6, 1e6) == 5.0
    with pytest.raises(CostError, match="no price"):
        hosted_price(load_price_table(str(path)), "gemini-2.5-flash")


def test_gpu_prices() -> None:
    assert gpu_hourly_usd("l4") == ("L4", 0.85)
    assert gpu_hourly_usd("B200", 9.5) == ("B200", 9.5)
    with pytest.raises(CostError, match="gpu-hourly-usd"):
        gpu_hourly_usd("H200")  # no trustworthy price recorded


@pytest.mark.parametrize(
    ("replica", "fixed", "capacity", "price", "expected"),
    [
        (24.0, 0.0, 100e6, 1.0, (24e6, 1)),  # one replica pays off from 24M tokens/day
        (24.0, 50.0, 100e6, 1.0, (74e6, 1)),  # fixed costs push it up
        (24.0, 100.0, 100e6, 1.0, (148e6, 2)),  # ... past one replica's capacity: durable from 2 replicas
        (120.0, 0.0, 100e6, 1.0, (None, None)),  # a full replica costs more than the API
        (100.0, 0.0, 100e6, 1.0, (None, None)),  # break-even only at exactly full use: never wins
        (0.0, 0.0, 100e6, 1.0, (0.0, 1)),
    ],
)
def test_break_even_table(
    replica: float, fixed: float, capacity: float, price: float, expected: tuple[float | None, int | None]
) -> None:
    volume, n = break_even(replica, fixed, capacity, price)
    assert n == expected[1]
    assert volume == (None if expected[0] is None else pytest.approx(expected[0]))


@pytest.mark.parametrize(("replica", "fixed"), [(24.0, 100.0), (20.4, 65.75), (60.0, 10.0), (5.0, 400.0)])
def test_break_even_is_durable(replica: float, fixed: float) -> None:
    capacity, price = 100e6, 1.0
    volume, _ = break_even(replica, fixed, capacity, price)
    assert volume is not None

    def own(v: float) -> float:
        return max(1, math.ceil(v / capacity)) * replica + fixed

    for k in range(1, 2000):
        v = volume + k * capacity / 97  # beyond the break-even, across many replica steps
        assert own(v) <= v * price / 1e6 + 1e-9
    assert own(volume * 0.999) > volume * 0.999 * price / 1e6


@pytest.mark.parametrize(
    ("volume", "break_even_volume", "peak_to_mean", "expected"),
    [
        (1e6, None, 1.0, "hosted"),
        (1e6, 5e6, 1.0, "hosted"),  # low volume
        (9e6, 5e6, 5.0, "hosted"),  # spiky
        (9e6, 5e6, 3.0, "self_host_core_spill_rest"),  # at the threshold still steady
        (9e6, 5e6, None, "self_host_core_spill_rest"),
        (5e6, 5e6, 1.2, "self_host_core_spill_rest"),
    ],
)
def test_recommendation_table(
    volume: float, break_even_volume: float | None, peak_to_mean: float | None, expected: str
) -> None:
    assert recommend(volume, break_even_volume, peak_to_mean)[0] == expected


def test_report_arithmetic() -> None:
    tokens = [TokenUsage("chat", "self_hosted", 30e6, 10e6), TokenUsage("chat", "gemini", 3e6, 1e6)]
    r = compute_report(
        CostInputs(
            86_400,
            tokens,
            "L4",
            0.85,
            2,
            1,
            FLASH,
            fixed_monthly_usd=730.0,
            capacity_tokens_per_second=1000.0,
            capacity_source="given",
            target_utilization=0.5,
        )
    )
    assert r.gpu_cost_usd == pytest.approx(2 * 0.85 * 24)
    assert r.fixed_cost_usd == pytest.approx(24.0)  # 730 $/month = 1 $/hour
    assert r.self_hosted_usd_per_million == pytest.approx((40.8 + 24.0) / 40)
    assert r.self_hosted_tokens_on_gemini_usd == pytest.approx(30 * 0.30 + 10 * 2.50)
    assert r.spilled_cost_usd == pytest.approx(3 * 0.30 + 1 * 2.50)
    assert r.hosted_usd_per_million == pytest.approx(0.75 * 0.30 + 0.25 * 2.50)
    assert r.tokens_per_day == pytest.approx(44e6)
    assert r.usable_capacity_tokens_per_second == 500.0
    expected = break_even(20.4, 24.0, 500 * 86_400, r.hosted_usd_per_million)
    assert (r.break_even_tokens_per_day, r.break_even_replicas) == expected


def write_snapshot(tmp_path: Path) -> str:
    path = tmp_path / "metrics.prom"
    path.write_text(SNAPSHOT)
    return str(path)


def test_cli_metrics_file_json_and_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chart = tmp_path / "cost.png"
    rc = main(
        [
            "cost",
            "--metrics-file",
            write_snapshot(tmp_path),
            "--window",
            "1d",
            "--gpu",
            "L4",
            "--capacity-tokens-per-second",
            "1500",
            "--json",
            "--chart",
            str(chart),
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["self_hosted_prompt_tokens"] == 30e6 and out["spilled_completion_tokens"] == 1e6
    assert out["replicas"] == 3
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--window is required"),
        (["--window", "1d", "--gpu", "H200"], "gpu-hourly-usd"),
        (["--window", "1d", "--gemini-model", "gemini-9"], "no price"),
        (["--window", "soon"], "invalid window"),
        (["--window", "1d", "--fixed-monthly-usd", "-3"], "fixed monthly"),
        (["--window", "1d", "--capacity-tokens-per-second", "0"], "capacity"),
        (["--window", "1d", "--price-file", "/nonexistent/prices.json"], "cannot read"),
    ],
)
def test_cli_bad_input_exits_2(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["cost", "--metrics-file", write_snapshot(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_garbage_metrics_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.prom"
    path.write_text("this is { not prometheus\n")
    assert main(["cost", "--metrics-file", str(path), "--window", "1h"]) == 2
    assert "Prometheus text" in capsys.readouterr().err


# --------------------------------------------------------------------------- Prometheus HTTP API
class _FakePrometheus(BaseHTTPRequestHandler):
    queries: list[str] = []

    def do_GET(self) -> None:
        q = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)["query"][0]
        self.queries.append(q)
        if TOKENS_METRIC in q and "increase" in q:
            result = [
                {"metric": {"model": "chat", "route": "self_hosted", "kind": "prompt"}, "value": [0, "3600000"]},
                {"metric": {"model": "chat", "route": "self_hosted", "kind": "completion"}, "value": [0, "1800000"]},
                {"metric": {"model": "chat", "route": "gemini", "kind": "prompt"}, "value": [0, "36000"]},
            ]
        elif "rate(" in q and 'route="self_hosted"' in q:
            result = [{"metric": {}, "value": [0, "3000"]}]  # peak self-hosted tokens/s
        elif "rate(" in q:
            result = [{"metric": {}, "value": [0, "4000"]}]  # peak of all tokens/s
        elif REPLICAS_METRIC in q:
            result = [{"metric": {}, "value": [0, "2"]}]
        else:
            result = []
        body = json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[str]:
    _FakePrometheus.queries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_cli_prometheus(prometheus: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["cost", "--prometheus", prometheus, "--window", "1h", "--gpu", "L4", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["self_hosted_prompt_tokens"] == 3_600_000 and out["spilled_prompt_tokens"] == 36_000
    assert out["replicas"] == 2
    assert out["capacity_source"] == "observed peak" and out["capacity_tokens_per_second"] == 1500
    # mean demand 5,436,000 tokens / 3600 s = 1510 tokens/s; peak 4000 tokens/s
    assert out["peak_to_mean"] == pytest.approx(4000 / 1510)
    assert any(f"increase({TOKENS_METRIC}[1h])" in q for q in _FakePrometheus.queries)


def test_cli_prometheus_unreachable_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrometheus)
    port = server.server_address[1]
    server.server_close()  # a port nobody listens on
    assert main(["cost", "--prometheus", f"http://127.0.0.1:{port}", "--timeout", "2"]) == 1
    assert "cannot reach Prometheus" in capsys.readouterr().err
