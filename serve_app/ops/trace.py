"""`serve-app trace`: drive a load profile at a running app and record how it scales, second by second.

Streaming chat requests go to the app's OpenAI API with a closed-loop concurrency that follows the
profile (a finished request is replaced at once while the offered concurrency allows it). Every second
the tool also reads the app's `GET /admin/pools` and, with --dashboard-url, the Ray dashboard's
`GET /api/serve/applications/` (target vs RUNNING replicas of the LLMServer deployments). The result
is a CSV (one row per second) and a PNG with the series on one time axis (serve_app.ops.trace_report).

The run is bounded: no request starts after --duration or beyond --max-requests, in-flight requests get
--drain seconds to finish and are then cancelled (counted as neither success nor error).
Streams are read by the shared client (serve_app.ops.sse_client: one TTFT/ITL definition for every load
tool). Tokens are counted per output chunk (one token per chunk from vLLM); when the final usage chunk
reports more completion tokens (hosted chunks carry several), the difference is added at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from serve_app.ops.sse_client import StreamRecorder, StreamStats, stream_post
from serve_app.ops.trace_report import (
    PROFILES,
    Profile,
    RequestRecord,
    Row,
    Sample,
    aggregate,
    schedule,
    write_chart,
    write_csv,
)

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "Tell a long story about a lighthouse keeper who collects maps."
POLL_TIMEOUT_S = 0.9  # a poll must not run into the next second's


@dataclass(frozen=True)
class TraceOptions:
    url: str
    model: str
    api_key: str | None = None
    profile: Profile = "step"
    duration_s: int = 60
    base_concurrency: int = 1
    peak_concurrency: int = 8
    max_tokens: int = 64
    prompt: str = DEFAULT_PROMPT
    ignore_eos: bool = False
    max_requests: int = 10_000
    request_timeout_s: float = 120.0
    drain_s: float = 30.0
    ttft_window_s: int = 5
    dashboard_url: str | None = None
    ray_token_file: Path | None = None
    deployment_prefix: str = "LLMServer"


def deployment_replicas(details: Any, prefix: str) -> dict[str, tuple[int, int]]:
    """(target, RUNNING replicas) per deployment whose name starts with `prefix`, from Ray's
    ServeInstanceDetails JSON: applications.<app>.deployments.<name>.{target_num_replicas, replicas[].state}.
    """
    out: dict[str, tuple[int, int]] = {}
    apps = details.get("applications") if isinstance(details, dict) else None
    for app in (apps or {}).values():
        for name, dep in (app.get("deployments") or {}).items():
            if not name.startswith(prefix):
                continue
            running = sum(1 for r in dep.get("replicas") or [] if r.get("state") == "RUNNING")
            out[name] = (int(dep.get("target_num_replicas") or 0), running)
    return out


def read_ray_token(path: Path | None) -> str | None:
    """Ray 2.60's dashboard wants `Authorization: Bearer <token>` from ~/.ray/auth_token (if auth is on)."""
    p = path or Path.home() / ".ray" / "auth_token"
    try:
        token = p.read_text().strip()
    except OSError:
        return None
    return token or None


def _copy_stats(stats: StreamStats, rec: RequestRecord, now: float) -> None:
    """The shared client's view of one stream into the trace's record: tokens per output chunk, plus the
    difference when the final usage reports more completion tokens (hosted chunks carry several)."""
    rec.served_by = stats.served_by
    rec.first_token = stats.first_output_at
    rec.tokens = list(stats.chunks)
    if stats.usage_tokens is not None and stats.usage_tokens > stats.pieces:
        rec.tokens.append((now, stats.usage_tokens - stats.pieces))


class Tracer:
    """One trace run: request workers, a per-second poller, and the records they leave."""

    def __init__(self, opts: TraceOptions, client: httpx.AsyncClient, clock: Callable[[], float]) -> None:
        self.opts = opts
        self.client = client
        self.clock = clock
        self.t0 = clock()
        self.offered = schedule(opts.profile, opts.duration_s, opts.base_concurrency, opts.peak_concurrency)
        self.records: list[RequestRecord] = []
        self.samples: dict[int, Sample] = {}
        self.in_flight: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
        self._ray_token = read_ray_token(opts.ray_token_file) if opts.dashboard_url else None
        self._poll_failures: Counter[str] = Counter()

    def now(self) -> float:
        return self.clock() - self.t0

    async def run(self) -> list[Row]:
        poller = asyncio.create_task(self._poll_loop())
        try:
            await self._drive()
            await self._drain()
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        return aggregate(self.records, self.offered, self.samples, self.opts.ttft_window_s)

    async def _drive(self) -> None:
        while (t := self.now()) < self.opts.duration_s:
            target = self.offered[min(int(t), len(self.offered) - 1)]
            while len(self.in_flight) < target and len(self.records) < self.opts.max_requests:
                self._start_request()
            self._wake.clear()
            # Wake on any completion (to top up at once) or at least every 0.1 s (profile changes).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(0.1, self.opts.duration_s - t))

    async def _drain(self) -> None:
        if not self.in_flight:
            return
        _, pending = await asyncio.wait(set(self.in_flight), timeout=self.opts.drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _start_request(self) -> None:
        record = RequestRecord(start=self.now())
        self.records.append(record)
        task = asyncio.create_task(self._request(record, len(self.records)))
        self.in_flight.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self.in_flight.discard(t)
            self._wake.set()

        task.add_done_callback(done)

    def _body(self, n: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.opts.model,
            # A per-request prefix keeps prefix caching from turning the trace into a cache benchmark.
            "messages": [{"role": "user", "content": f"[{n}] {self.opts.prompt}"}],
            "max_tokens": self.opts.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.opts.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def _request(self, rec: RequestRecord, n: int) -> None:
        url = self.opts.url.rstrip("/") + "/v1/chat/completions"
        stream = StreamRecorder(rec.start, record_itl=False, record_chunks=True)
        try:
            stats = await stream_post(self.client, url, self._body(n), self._headers, self.now, stream)
        except asyncio.CancelledError:
            rec.cancelled = True
            raise
        finally:
            rec.end = self.now()
            _copy_stats(stream.stats, rec, rec.end)
        rec.error = stats.error

    async def _poll_loop(self) -> None:
        second = 0
        while True:
            delay = self.t0 + second - self.clock()
            if delay > 0:
                await asyncio.sleep(delay)
            in_flight = len(self.in_flight)
            pools, deployments = await asyncio.gather(self._poll_pools(), self._poll_dashboard())
            self.samples[second] = Sample(in_flight=in_flight, pools=pools, deployments=deployments)
            second = max(second + 1, int(self.now()))

    async def _get_json(self, what: str, url: str, headers: dict[str, str]) -> Any:
        try:
            resp = await self.client.get(url, headers=headers, timeout=POLL_TIMEOUT_S)
            resp.raise_for_status()
            return resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._poll_failures[what] += 1
            if self._poll_failures[what] == 1:  # once per source: a down endpoint must not flood the log
                logger.warning("trace: %s poll failed (%s); its columns stay empty", what, type(exc).__name__)
            return None

    async def _poll_pools(self) -> dict[str, Any] | None:
        data = await self._get_json("pools", self.opts.url.rstrip("/") + "/admin/pools", self._headers)
        pools = data.get("pools") if isinstance(data, dict) else None
        return pools if isinstance(pools, dict) else None

    async def _poll_dashboard(self) -> dict[str, tuple[int, int]] | None:
        if not self.opts.dashboard_url:
            return None
        headers = {"Authorization": f"Bearer {self._ray_token}"} if self._ray_token else {}
        url = self.opts.dashboard_url.rstrip("/") + "/api/serve/applications/"
        data = await self._get_json("dashboard", url, headers)
        return None if data is None else deployment_replicas(data, self.opts.deployment_prefix)


async def run_trace(opts: TraceOptions, client: httpx.AsyncClient | None = None) -> list[Row]:
    """Run one trace and return its rows. Pass `client` to reuse (or fake) the HTTP transport."""
    loop = asyncio.get_running_loop()
    if client is not None:
        return await Tracer(opts, client, loop.time).run()
    timeout = httpx.Timeout(opts.request_timeout_s, connect=10.0)
    limits = httpx.Limits(
        max_connections=opts.peak_concurrency + 4, max_keepalive_connections=opts.peak_concurrency + 4
    )
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as own:
        return await Tracer(opts, own, loop.time).run()


def summarize(rows: list[Row]) -> str:
    def total(key: str) -> float:
        return sum(float(v) for r in rows if isinstance(v := r.get(key), int | float))

    done, errors, spilled = total("completed"), total("errors"), total("spilled")
    served = spilled + total("self_hosted")
    share = f"{spilled / served:.1%}" if served else "n/a"
    return (
        f"{len(rows)} s: {int(done)} completed, {int(errors)} errors, {total('tokens_per_s'):.0f} tokens, "
        f"spilled {share}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _handle(args: argparse.Namespace) -> int:
    if args.base_concurrency > args.peak_concurrency:
        print("serve-app trace: --base-concurrency must not exceed --peak-concurrency", file=sys.stderr)
        return 2
    opts = TraceOptions(
        url=args.url,
        model=args.model,
        api_key=args.api_key or os.environ.get(args.api_key_env) or None,
        profile=args.profile,
        duration_s=args.duration,
        base_concurrency=args.base_concurrency,
        peak_concurrency=args.peak_concurrency,
        max_tokens=args.max_tokens,
        prompt=args.prompt,
        ignore_eos=args.ignore_eos,
        max_requests=args.max_requests,
        request_timeout_s=args.request_timeout,
        drain_s=args.drain,
        dashboard_url=args.dashboard_url,
        ray_token_file=args.ray_token_file,
        deployment_prefix=args.deployment_prefix,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = asyncio.run(run_trace(opts))
    csv_path, png_path = out.with_suffix(".csv"), out.with_suffix(".png")
    write_csv(rows, csv_path)
    written = [str(csv_path)]
    try:
        title = f"{opts.model}: {opts.profile} {opts.base_concurrency}->{opts.peak_concurrency}"
        write_chart(rows, png_path, title=title)
        written.append(str(png_path))
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(
            "serve-app trace: no chart: matplotlib is not installed (pip install 'serve-app[trace]')", file=sys.stderr
        )
    print(summarize(rows))
    print(f"wrote {' and '.join(written)}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "trace",
        help="drive a load profile at a running app; record scaling, latency and spill per second",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    p.add_argument("--model", required=True, help="model alias to request")
    p.add_argument("--api-key", default=None, help="client API key (default: from --api-key-env)")
    p.add_argument("--api-key-env", default="SERVE_APP_API_KEY", help="env var holding the API key")
    p.add_argument("--profile", choices=PROFILES, default="step", help="load shape (see description)")
    p.add_argument("--duration", type=_positive_int, default=60, help="seconds of offered load")
    p.add_argument("--base-concurrency", type=_non_negative_int, default=1, help="concurrent requests off-peak")
    p.add_argument("--peak-concurrency", type=_positive_int, default=8, help="concurrent requests at peak")
    p.add_argument("--max-tokens", type=_positive_int, default=64, help="max_tokens of every request")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="user message (a request number is prefixed)")
    p.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos (fixed-length outputs)")
    p.add_argument("--max-requests", type=_positive_int, default=10_000, help="stop starting requests after this")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per-request read timeout (s)")
    p.add_argument("--drain", type=float, default=30.0, help="seconds in-flight requests get after --duration")
    p.add_argument("--dashboard-url", default=None, help="Ray dashboard, e.g. http://127.0.0.1:8265")
    p.add_argument("--ray-token-file", type=Path, default=None, help="default: ~/.ray/auth_token")
    p.add_argument("--deployment-prefix", default="LLMServer", help="dashboard deployments to chart")
    p.add_argument("--out", default="trace", help="output path without suffix: writes OUT.csv and OUT.png")
    p.set_defaults(func=_handle)
