"""serve-app trace: profiles, aggregation, CSV/PNG output, and a run against a fake OpenAI SSE server."""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serve_app.ops import trace
from serve_app.ops.trace_report import (
    BASE_COLUMNS,
    RequestRecord,
    Sample,
    aggregate,
    percentile,
    schedule,
    write_chart,
    write_csv,
)

# ------------------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize(
    ("profile", "duration", "base", "peak", "expected"),
    [
        ("step", 8, 1, 4, [1, 1, 4, 4, 4, 4, 1, 1]),
        ("step", 4, 0, 2, [0, 2, 2, 0]),
        ("ramp", 9, 0, 8, [0, 2, 4, 6, 8, 6, 4, 2, 0]),
        ("ramp", 5, 2, 2, [2, 2, 2, 2, 2]),
        ("spike", 10, 1, 9, [1, 1, 1, 1, 9, 1, 1, 1, 1, 1]),
        ("spike", 20, 0, 5, [0] * 8 + [5, 5] + [0] * 10),
        ("step", 0, 1, 4, []),
    ],
)
def test_schedule(profile: Any, duration: int, base: int, peak: int, expected: list[int]) -> None:
    assert schedule(profile, duration, base, peak) == expected


def test_schedule_rejects_unknown_profile() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        schedule("sine", 5, 1, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([], 50, None), ([3.0], 99, 3.0), ([1, 2, 3, 4], 50, 2.5), ([5, 1, 3], 50, 3.0), ([0, 10], 99, 9.9)],
)
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    got = percentile(values, q)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_aggregate_counts_each_event_in_its_second() -> None:
    records = [
        RequestRecord(start=0.1, served_by="self-hosted", first_token=0.6, end=1.2, tokens=[(0.6, 1), (1.1, 1)]),
        RequestRecord(start=0.2, served_by="gemini", first_token=1.7, end=2.5, tokens=[(1.7, 3), (2.4, 5)]),
        RequestRecord(start=1.5, end=1.6, error="HTTP 503"),
        RequestRecord(start=2.1, served_by="self-hosted", first_token=2.2, end=9.0, cancelled=True),
    ]
    pools = {"p": {"replicas": 2, "waiting": 1.5, "running": 3.0, "saturated": True, "breaker": "closed"}}
    samples = {0: Sample(in_flight=2, pools=pools, deployments={"LLMServer-p": (3, 2)}), 1: Sample(in_flight=1)}
    rows = aggregate(records, [2, 2, 1], samples, ttft_window_s=2)
    assert len(rows) == 10  # through the cancelled request's end at 9.0
    r0, r1, r2 = rows[:3]
    assert (r0["started"], r0["completed"], r0["errors"], r0["tokens_per_s"]) == (2, 0, 0, 1)
    assert (r1["started"], r1["completed"], r1["errors"], r1["tokens_per_s"]) == (1, 1, 1, 4)
    assert (r2["started"], r2["completed"], r2["errors"], r2["tokens_per_s"]) == (1, 1, 0, 5)
    assert r0["ttft_p50_s"] == 0.5
    assert r1["ttft_p50_s"] == pytest.approx(1.0)  # window of 2 s: 0.5 and 1.5
    assert r2["ttft_p50_s"] == pytest.approx((1.5 + 0.1) / 2)  # the cancelled request's first token counts
    assert (r0["self_hosted"], r0["spilled"], r0["spilled_share"]) == (1, 1, 0.5)
    assert r1["spilled_share"] is None  # the failed request named nobody
    assert r0["pool_p_replicas"] == 2 and r0["pool_p_saturated"] == 1 and r0["pool_p_breaker"] == "closed"
    assert r0["pool_p_kv_cache_usage"] is None  # missing from the report
    assert (r0["ray_LLMServer-p_target"], r0["ray_LLMServer-p_running"]) == (3, 2)
    assert r0["in_flight"] == 2 and r2["in_flight"] is None
    assert [r["offered_concurrency"] for r in rows[:4]] == [2, 2, 1, 0]
    assert sum(int(r["completed"] or 0) for r in rows) == 2 and sum(int(r["errors"] or 0) for r in rows) == 1


def test_write_csv_has_one_row_per_second_and_every_column(tmp_path: Path) -> None:
    rows = aggregate(
        [RequestRecord(start=0.0, served_by="self-hosted", first_token=0.2, end=0.5, tokens=[(0.2, 1)])],
        [1, 1],
        {1: Sample(pools={"a": {"replicas": 1}})},
    )
    path = tmp_path / "t.csv"
    write_csv(rows, path)
    with path.open() as f:
        got = list(csv.DictReader(f))
    assert len(got) == 2
    assert list(got[0])[: len(BASE_COLUMNS)] == list(BASE_COLUMNS)
    assert "pool_a_replicas" in got[0]
    assert got[0]["pool_a_replicas"] == "" and got[1]["pool_a_replicas"] == "1"
    assert got[0]["ttft_p50_s"] == "0.2" and got[1]["ttft_p50_s"] == "0.2"  # still in the trailing window
    assert got[1]["spilled_share"] == ""


def test_write_chart_writes_a_png(tmp_path: Path) -> None:
    samples = {
        s: Sample(in_flight=s, pools={"p": {"replicas": 1 + s // 2}}, deployments={"LLMServer-p": (2, 1)})
        for s in range(4)
    }
    rows = aggregate([RequestRecord(start=0, first_token=1, end=2, tokens=[(1, 3)])], [1, 2, 2, 1], samples)
    path = tmp_path / "t.png"
    write_chart(rows, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_deployment_replicas_reads_rays_schema() -> None:
    from ray.serve.schema import ApplicationDetails, DeploymentDetails, ReplicaDetails, ServeInstanceDetails

    # The keys we read exist in Ray's own response models (a rename in Ray fails here).
    assert "applications" in ServeInstanceDetails.model_fields
    assert "deployments" in ApplicationDetails.model_fields
    assert {"target_num_replicas", "replicas"} <= set(DeploymentDetails.model_fields)
    assert "state" in ReplicaDetails.model_fields
    details = {
        "applications": {
            "default": {
                "deployments": {
                    "Gateway": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
                    "LLMServer-a": {
                        "target_num_replicas": 3,
                        "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}, {"state": "RUNNING"}],
                    },
                    "LLMServer-b": {"target_num_replicas": 0, "replicas": []},
                }
            }
        }
    }
    assert trace.deployment_replicas(details, "LLMServer") == {"LLMServer-a": (3, 2), "LLMServer-b": (0, 0)}
    assert trace.deployment_replicas({"applications": {}}, "LLMServer") == {}
    assert trace.deployment_replicas("garbage", "LLMServer") == {}


def test_read_ray_token(tmp_path: Path) -> None:
    token = tmp_path / "auth_token"
    token.write_text("abc123\n")
    assert trace.read_ray_token(token) == "abc123"
    assert trace.read_ray_token(tmp_path / "missing") is None


# ------------------------------------------------------------------------------- fake OpenAI server
API_KEY = "k-test"
RAY_TOKEN = "ray-token"
FIRST_TOKEN_DELAY_S = 0.05


class FakeApp:
    """OpenAI chat streaming with a deterministic mix: every 5th request 503s, every 3rd is 'spilled'
    (chunks of 2 tokens, like a hosted model) and the rest stream 1 token per chunk."""

    def __init__(self) -> None:
        self.n = 0
        self.ok = 0
        self.failed = 0
        self.spilled = 0
        self.tokens = 0
        self.in_flight = 0
        self.unauthorized = 0
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/admin/pools", self.pools),
                Route("/api/serve/applications/", self.dashboard),
            ]
        )

    async def chat(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            self.unauthorized += 1
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        body = await request.json()
        assert body["stream"] is True and body["messages"][0]["role"] == "user"
        self.n += 1
        if self.n % 5 == 0:
            self.failed += 1
            return JSONResponse({"error": {"message": "busy"}}, status_code=503)
        spilled = self.n % 3 == 0
        slow = body["model"] == "slow"
        max_tokens = int(body["max_tokens"])

        async def events() -> AsyncIterator[str]:
            self.in_flight += 1
            try:
                await asyncio.sleep(FIRST_TOKEN_DELAY_S)
                step = 2 if spilled else 1
                for _ in range(0, max_tokens, step):
                    chunk = {"choices": [{"index": 0, "delta": {"content": "ab"[:step]}}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(1.0 if slow else 0.01)
                # Count before the last events: the client may hang up as soon as it has them.
                self.ok += 1
                self.spilled += spilled
                self.tokens += max_tokens
                yield f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': max_tokens}})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight -= 1

        headers = {"x-served-by": "gemini" if spilled else "self-hosted"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def pools(self, request: Request) -> Response:
        replicas = 1 + self.in_flight // 2
        pool = {"replicas": replicas, "waiting": 0.0, "running": float(self.in_flight), "kv_cache_usage": 0.1,
                "tokens_per_s": 5.0, "saturated": False, "breaker": "closed"}  # fmt: skip
        return JSONResponse({"pools": {"small": pool}})

    async def dashboard(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {RAY_TOKEN}":
            return Response("Unauthorized: Missing authentication token", status_code=401)
        dep = {"target_num_replicas": 2, "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]}
        return JSONResponse({"applications": {"default": {"deployments": {"LLMServer-small": dep}}}})


@pytest.fixture
def fake_server() -> Iterator[tuple[FakeApp, str]]:
    fake = FakeApp()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _total(rows: list[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows if isinstance(r.get(key), int | float))


async def test_trace_against_fake_server(fake_server: tuple[FakeApp, str], tmp_path: Path) -> None:
    fake, url = fake_server
    token = tmp_path / "auth_token"
    token.write_text(RAY_TOKEN)
    opts = trace.TraceOptions(
        url=url, model="small", api_key=API_KEY, profile="step", duration_s=4, base_concurrency=1,
        peak_concurrency=3, max_tokens=4, drain_s=5, dashboard_url=url, ray_token_file=token,
    )  # fmt: skip
    started = time.monotonic()
    rows = await trace.run_trace(opts)
    assert time.monotonic() - started < 7
    assert fake.unauthorized == 0 and fake.ok > 10
    assert 4 <= len(rows) <= 5  # the duration, plus possibly the second the last request ended in
    assert [r["offered_concurrency"] for r in rows[:4]] == [1, 3, 3, 1]
    assert _total(rows, "started") == fake.n  # every request the server saw
    assert _total(rows, "completed") == fake.ok
    assert _total(rows, "errors") == fake.failed
    assert _total(rows, "spilled") == fake.spilled
    assert _total(rows, "spilled") + _total(rows, "self_hosted") == fake.ok
    assert _total(rows, "tokens_per_s") == fake.tokens  # hosted chunks carry 2 tokens: usage fills the gap
    p50s = [r["ttft_p50_s"] for r in rows if r["ttft_p50_s"] is not None]
    assert p50s and all(FIRST_TOKEN_DELAY_S <= float(p) < 1.0 for p in p50s)
    assert rows[0]["pool_small_replicas"] == 1 and rows[0]["pool_small_breaker"] == "closed"
    assert all(r.get("ray_LLMServer-small_target") == 2 for r in rows[:4])
    assert all(r.get("ray_LLMServer-small_running") == 1 for r in rows[:4])


async def test_trace_is_bounded_in_count_and_time(fake_server: tuple[FakeApp, str]) -> None:
    fake, url = fake_server
    # 'slow' streams a token a second: nothing finishes; the drain cancels what is left.
    opts = trace.TraceOptions(
        url=url, model="slow", api_key=API_KEY, duration_s=1, base_concurrency=4, peak_concurrency=4,
        max_tokens=50, max_requests=3, drain_s=0.3,
    )  # fmt: skip
    started = time.monotonic()
    rows = await trace.run_trace(opts)
    assert time.monotonic() - started < 2.5
    assert fake.n == 3 and _total(rows, "started") == 3
    assert _total(rows, "completed") == 0 and _total(rows, "errors") == 0  # cancelled is neither
    assert _total(rows, "tokens_per_s") >= 3  # the first tokens did arrive


def test_cli_writes_csv_and_png(fake_server: tuple[FakeApp, str], tmp_path: Path, capsys: Any) -> None:
    fake, url = fake_server
    parser = argparse.ArgumentParser()
    trace.register(parser.add_subparsers())
    out = tmp_path / "run" / "trace"
    args = parser.parse_args(
        ["trace", "--url", url, "--model", "small", "--api-key", API_KEY, "--profile", "spike", "--duration", "2",
         "--peak-concurrency", "2", "--max-tokens", "3", "--out", str(out)]
    )  # fmt: skip
    assert args.func(args) == 0
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with out.with_suffix(".csv").open() as f:
        got = list(csv.DictReader(f))
    assert len(got) >= 2 and sum(int(r["completed"]) for r in got) == fake.ok
    assert "completed" in capsys.readouterr().out


def test_cli_rejects_base_above_peak(capsys: Any) -> None:
    parser = argparse.ArgumentParser()
    trace.register(parser.add_subparsers())
    args = parser.parse_args(["trace", "--model", "m", "--base-concurrency", "5", "--peak-concurrency", "2"])
    assert args.func(args) == 2
    assert "must not exceed" in capsys.readouterr().err
