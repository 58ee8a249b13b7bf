"""One request's journey after validation: pick a backend, peek at the first reply, spill, stream, record.

The spill decision is made before the first byte: a self-hosted attempt that is saturated, back-pressured,
failing or silent past the first-token timeout goes to Gemini when the route allows. After the first byte,
a failure becomes one SSE error event and the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.config import RouteConfig
from serve_app.errors import APIError, RateLimited, ServiceUnavailable, error_body, status_error
from serve_app.metrics import Metrics
from serve_app.pools import PoolMonitor
from serve_app.protocol import DONE, ChunkReply, ErrorReply, JSONReply, Reply, sse_error
from serve_app.routing import decide, may_spill_after_failure

logger = logging.getLogger(__name__)
request_log = logging.getLogger("serve_app.requests")

SELF_HOSTED, GEMINI = "self_hosted", "gemini"
_SERVED_BY = {SELF_HOSTED: "self-hosted", GEMINI: "gemini"}


class HostedBackend(Protocol):
    available: bool

    def check_supported(self, body: dict[str, Any], kind: str) -> None: ...

    def chat(self, body: dict[str, Any], alias: str, request_id: str) -> AsyncIterator[Reply]: ...

    def completion(self, body: dict[str, Any], alias: str, request_id: str) -> AsyncIterator[Reply]: ...


class PoolCaller(Protocol):
    """Opens a streaming call to a pool: (kind, body, alias, request_id) -> async iterator of Reply."""

    def __call__(self, pool: str, kind: str, body: dict[str, Any], alias: str, request_id: str) -> Any: ...


class SpillableFailure(Exception):
    """The self-hosted attempt failed before its first byte."""

    def __init__(self, reason: str, error: APIError, counts_against_pool: bool) -> None:
        super().__init__(reason)
        self.reason, self.error, self.counts_against_pool = reason, error, counts_against_pool


@dataclass
class RequestRecord:
    """What the per-request log line and the metrics say about one request."""

    request_id: str
    alias: str
    kind: str
    stream: bool
    started: float = field(default_factory=time.monotonic)
    route: str = "none"
    upstream_model: str = ""
    spill_reason: str = ""
    outcome: str = "ok"
    status: int = 200
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def log_fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "model": self.alias,
            "kind": self.kind,
            "stream": self.stream,
            "route": self.route,
            "spill_reason": self.spill_reason or None,
            "status": self.status,
            "outcome": self.outcome,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }


def outcome_for_status(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (429, 503):
        return "rejected"
    return "client_error" if status < 500 else "server_error"


class Dispatcher:
    """Runs requests for the gateway; holds no HTTP concerns beyond building the response."""

    def __init__(self, monitor: PoolMonitor, metrics: Metrics, call_pool: PoolCaller, retry_after_s: int) -> None:
        self.monitor = monitor
        self.metrics = metrics
        self.call_pool = call_pool
        self.retry_after_s = retry_after_s
        self.hosted: HostedBackend | None = None
        self.served_names: dict[str, str] = {}
        self._inflight: dict[tuple[str, str], int] = {}

    def _set_route(self, rec: RequestRecord, route: str) -> None:
        """Move the request's in-flight count to `route` (a spill moves it from self_hosted to gemini)."""
        self._count_inflight(rec, -1)
        rec.route = route
        self._count_inflight(rec, +1)

    def _count_inflight(self, rec: RequestRecord, delta: int) -> None:
        if rec.route == "none":
            return
        key = (rec.alias, rec.route)
        self._inflight[key] = self._inflight.get(key, 0) + delta
        self.metrics.set("inflight_requests", self._inflight[key], model=rec.alias, route=rec.route)

    # ------------------------------------------------------------------------------------ entry point
    async def run(self, rec: RequestRecord, route: RouteConfig, body: dict[str, Any]) -> Response:
        hosted_ok, hosted_err = self._hosted_fit(route, body, rec.kind)
        pool = route.pool
        now = time.monotonic()
        if pool is not None and route.policy != "hosted_only":
            saturated = self.monitor.saturated(pool)
            allows = route.policy == "self_hosted_only" or self.monitor.breaker(pool).allow(now)
        else:
            saturated, allows = False, True
        decision = decide(
            route.policy,
            saturated=saturated,
            breaker_allows=allows,
            hosted_available=self.hosted is not None and self.hosted.available,
            hosted_supports_request=hosted_err is None,
        )
        if decision.target == "reject":
            if hosted_err is not None and route.policy == "hosted_only":
                raise hosted_err
            raise ServiceUnavailable(
                "the self-hosted pool is degraded and no hosted model can take the request",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        if decision.target == GEMINI:
            rec.spill_reason = decision.reason
            return await self._via_gemini(rec, route, body)
        assert pool is not None
        try:
            return await self._via_pool(rec, route, pool, body)
        except SpillableFailure as failure:
            if not may_spill_after_failure(route.policy, hosted_ok, hosted_err is None):
                raise failure.error from None
            rec.spill_reason = failure.reason
            return await self._via_gemini(rec, route, body)

    def _hosted_fit(self, route: RouteConfig, body: dict[str, Any], kind: str) -> tuple[bool, APIError | None]:
        if route.gemini_model is None or self.hosted is None:
            return False, ServiceUnavailable("no hosted model is configured for this route")
        if not self.hosted.available:
            return False, ServiceUnavailable("the hosted model is not configured (missing API key)")
        try:
            self.hosted.check_supported(body, kind)
        except APIError as err:
            return True, err
        return True, None

    # ------------------------------------------------------------------------------------ self-hosted
    async def _via_pool(self, rec: RequestRecord, route: RouteConfig, pool: str, body: dict[str, Any]) -> Response:
        state = self.monitor.pools[pool]
        breaker = state.breaker
        self._set_route(rec, SELF_HOSTED)
        rec.upstream_model = self.served_names.get(pool, pool)
        state.inflight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.inflight -= 1

        try:
            gen = self.call_pool(pool, rec.kind, dict(body), rec.alias, rec.request_id)
            first = await self._first(gen, route.breaker.first_token_timeout_s if rec.stream else None)
        except SpillableFailure as failure:
            release()
            if failure.counts_against_pool and route.policy != "self_hosted_only":
                breaker.record(time.monotonic(), ok=False)
            raise
        except BaseException:
            release()
            raise
        if isinstance(first, ErrorReply) and first.status >= 500:
            release()
            breaker.record(time.monotonic(), ok=False)
            err = status_error(first.status, str(first.body.get("error", {}).get("message", "engine error")))
            raise SpillableFailure("error_before_first_token", err, True)
        self.metrics.observe("queue_seconds", time.monotonic() - rec.started, model=rec.alias, route=rec.route)

        def on_done(ok: bool) -> None:
            release()
            if route.policy != "self_hosted_only":
                breaker.record(time.monotonic(), ok=ok)

        return self._respond(rec, first, gen, on_done)

    async def _first(self, gen: Any, deadline_s: float | None) -> Reply:
        from ray.serve.exceptions import BackPressureError

        try:
            if deadline_s is None:
                first: Reply = await gen.__anext__()
            else:
                first = await asyncio.wait_for(gen.__anext__(), deadline_s)
        except BackPressureError:
            raise SpillableFailure(
                "backpressure",
                RateLimited("the self-hosted pool is at capacity", headers={"Retry-After": str(self.retry_after_s)}),
                False,
            ) from None
        except TimeoutError:
            _cancel(gen)
            raise SpillableFailure(
                "error_before_first_token", ServiceUnavailable("no first token within the timeout"), True
            ) from None
        except (asyncio.CancelledError, GeneratorExit):
            _cancel(gen)
            raise
        except StopAsyncIteration:
            raise SpillableFailure(
                "error_before_first_token", ServiceUnavailable("the engine returned nothing"), True
            ) from None
        except Exception as err:
            if _is_backpressure(err):
                raise SpillableFailure(
                    "backpressure",
                    RateLimited(
                        "the self-hosted pool is at capacity",
                        headers={"Retry-After": str(self.retry_after_s)},
                    ),
                    False,
                ) from None
            logger.warning("pool failed before the first token: %s: %s", type(err).__name__, err)
            raise SpillableFailure(
                "error_before_first_token", ServiceUnavailable("the self-hosted engine failed"), True
            ) from None
        return first

    # ------------------------------------------------------------------------------------ hosted
    async def _via_gemini(self, rec: RequestRecord, route: RouteConfig, body: dict[str, Any]) -> Response:
        assert self.hosted is not None and route.gemini_model is not None
        self._set_route(rec, GEMINI)
        rec.upstream_model = route.gemini_model
        if rec.spill_reason:
            self.metrics.inc("spill", model=rec.alias, reason=rec.spill_reason)
        hosted_body = dict(body)
        hosted_body["model"] = route.gemini_model
        method = self.hosted.chat if rec.kind == "chat" else self.hosted.completion
        gen = method(hosted_body, rec.alias, rec.request_id)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise ServiceUnavailable("the hosted model returned nothing") from None
        except APIError as err:
            if isinstance(err, RateLimited | ServiceUnavailable):
                err.headers.setdefault("Retry-After", str(self.retry_after_s))
            raise
        self.metrics.observe("queue_seconds", time.monotonic() - rec.started, model=rec.alias, route=rec.route)
        return self._respond(rec, first, gen, lambda ok: None)

    # ------------------------------------------------------------------------------------ response
    def _respond(self, rec: RequestRecord, first: Reply, gen: Any, on_done: Callable[[bool], None]) -> Response:
        headers = {
            "x-served-by": _SERVED_BY[rec.route],
            "x-upstream-model": rec.upstream_model,
            "x-request-id": rec.request_id,
        }
        if rec.spill_reason:
            headers["x-spill-reason"] = rec.spill_reason
        if isinstance(first, ErrorReply):
            on_done(True)  # the engine judged the request: that is the engine working
            rec.status, rec.outcome = first.status, outcome_for_status(first.status)
            self.finish(rec)
            return JSONResponse(first.body, status_code=first.status, headers=headers)
        if isinstance(first, JSONReply):
            on_done(True)
            usage = first.body.get("usage") or {}
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            rec.completion_tokens = int(usage.get("completion_tokens") or 0)
            self.finish(rec)
            return JSONResponse(first.body, headers=headers)
        return StreamingResponse(
            self._stream(rec, first, gen, on_done),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )

    async def _stream(
        self, rec: RequestRecord, first: ChunkReply, gen: Any, on_done: Callable[[bool], None]
    ) -> AsyncIterator[str]:
        """Write the stream. Chunks are not merged here: the replica already merges what piles up, and a
        second merge in the gateway made no measurable difference (bench/results/streaming_ceiling-*)."""
        last = time.monotonic()
        ok = True
        item: Reply = first
        try:
            while True:
                if isinstance(item, ChunkReply):
                    if item.usage is not None:
                        rec.prompt_tokens = int(item.usage.get("prompt_tokens") or 0)
                        rec.completion_tokens = int(item.usage.get("completion_tokens") or 0)
                    if item.tokens:
                        now = time.monotonic()
                        if rec.ttft_s is None:
                            rec.ttft_s = now - rec.started
                            self.metrics.observe("ttft_seconds", rec.ttft_s, model=rec.alias, route=rec.route)
                        else:
                            gap = (now - last) / item.tokens
                            for _ in range(min(item.tokens, 64)):
                                self.metrics.observe("itl_seconds", gap, model=rec.alias, route=rec.route)
                        last = now
                    if not item.usage_only and item.data:
                        yield item.data
                elif isinstance(item, ErrorReply):
                    ok = item.status < 500
                    rec.status, rec.outcome = item.status, outcome_for_status(item.status)
                    yield sse_error(item.status, item.body)
                    break
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    break
        except (asyncio.CancelledError, GeneratorExit):
            rec.outcome, rec.status = "client_abort", 499
            _cancel(gen)
            raise
        except Exception as err:
            ok = False
            status = err.status if isinstance(err, APIError) else 500
            message = err.message if isinstance(err, APIError) else "the backend failed mid-stream"
            logger.warning("request %s failed mid-stream: %s", rec.request_id, type(err).__name__)
            rec.status, rec.outcome = status, "server_error"
            yield sse_error(status, error_body(message, "server_error", None, status))
        finally:
            on_done(ok and rec.outcome != "client_abort")
            self.finish(rec)
        yield DONE

    def finish(self, rec: RequestRecord) -> None:
        self._count_inflight(rec, -1)
        labels = {"model": rec.alias, "route": rec.route}
        duration = time.monotonic() - rec.started
        self.metrics.inc("requests", model=rec.alias, route=rec.route, outcome=rec.outcome)
        self.metrics.observe("request_duration_seconds", duration, outcome=rec.outcome, **labels)
        self.metrics.inc("tokens", rec.prompt_tokens, kind="prompt", **labels)
        self.metrics.inc("tokens", rec.completion_tokens, kind="completion", **labels)
        request_log.info(json.dumps(rec.log_fields(), separators=(",", ":")))


def _cancel(gen: Any) -> None:
    """Stop a backend stream now: Ray response generators cancel; async generators are closed."""
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        with contextlib.suppress(Exception):
            cancel()
        return
    _close(gen)


def _close(it: AsyncIterator[Reply]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        task = asyncio.ensure_future(aclose())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _is_backpressure(err: BaseException) -> bool:
    """BackPressureError may arrive wrapped (RayTaskError) when raised in another process."""
    from ray.serve.exceptions import BackPressureError

    cause = getattr(err, "cause", None)
    return isinstance(err, BackPressureError) or isinstance(cause, BackPressureError)
