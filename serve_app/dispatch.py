"""One request's journey after validation: choose a backend, get its first output, retry or spill, respond.

Before the first byte reaches the client nothing is lost by trying again, so a pool attempt that fails
then (replica died, engine dead, an error event where output should be, no first output in time) is
retried on another replica, then spilled when the route allows, else answered 503 with Retry-After.
Back-pressure (the pool is full) spills or answers 429 at once. After the first byte the stream is
relayed by `serve_app.relay`, which continues a broken stream where it can.

The breaker hears only about the pool's own health: an admitted attempt settles its ticket exactly once,
as ok, failed, or neutral (client gone, back-pressure: the pool did nothing wrong).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.responses import Response

from serve_app.config import GatewayConfig, RouteConfig
from serve_app.errors import APIError, RateLimited, ServiceUnavailable, status_error
from serve_app.lifecycle import Ledger, RequestRecord
from serve_app.metrics import Metrics
from serve_app.pools import PoolMonitor
from serve_app.protocol import ChunkReply, ErrorReply, JSONReply, Reply, split_inband_error
from serve_app.relay import Backend, Relay, json_response, stream_response
from serve_app.routing import Ticket, decide, may_spill_after_failure
from serve_app.slo_state import SloTicket, estimate_prompt_tokens

logger = logging.getLogger(__name__)

SELF_HOSTED, GEMINI = "self_hosted", "gemini"
RETRY_BACKOFF_S = 0.2


class HostedBackend(Protocol):
    available: bool

    def check_supported(self, body: dict[str, Any], kind: str) -> None: ...

    def chat(
        self,
        body: dict[str, Any],
        alias: str,
        request_id: str,
        *,
        thinking_budget: int | None = None,
        continue_final_message: bool = False,
    ) -> AsyncIterator[Reply]: ...

    def completion(
        self,
        body: dict[str, Any],
        alias: str,
        request_id: str,
        *,
        thinking_budget: int | None = None,
        continue_final_message: bool = False,
    ) -> AsyncIterator[Reply]: ...


class PoolCaller(Protocol):
    """Opens a streaming call to a pool: (pool, kind, body, alias, request_id) -> async iterator of Reply."""

    def __call__(
        self, pool: str, kind: str, body: dict[str, Any], alias: str, request_id: str, lora: str | None
    ) -> Any: ...


class AttemptFailed(Exception):
    """A pool attempt failed before its first byte."""

    def __init__(self, reason: str, error: APIError, *, pool_fault: bool, retryable: bool) -> None:
        super().__init__(reason)
        self.reason, self.error, self.pool_fault, self.retryable = reason, error, pool_fault, retryable


@dataclass
class Head:
    """What a backend sent before (and including) its first output: held back until the decision is made."""

    items: list[Reply]

    @property
    def last(self) -> Reply:
        return self.items[-1]


def carries_output(item: ChunkReply) -> bool:
    return item.tokens > 0 or item.usage is not None


async def read_head(gen: Any, timeout_s: float | None) -> Head:
    """Pull items until the first output (or an error / whole reply). Raises AttemptFailed on failure."""
    items: list[Reply] = []
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                item: Reply = await gen.__anext__()
                if isinstance(item, ChunkReply):
                    _before, err = split_inband_error(item)
                    if err is not None:
                        item = err
                    elif not carries_output(item):
                        items.append(item)  # role-only chunks: not yet output
                        continue
                items.append(item)
                break
    except TimeoutError:
        cancel(gen)
        raise AttemptFailed(
            "first_token_timeout",
            ServiceUnavailable(f"no first token within {timeout_s:g} s"),
            pool_fault=True,
            retryable=True,
        ) from None
    except StopAsyncIteration:
        raise AttemptFailed(
            "error_before_first_token",
            ServiceUnavailable("the engine returned nothing"),
            pool_fault=True,
            retryable=True,
        ) from None
    except (asyncio.CancelledError, GeneratorExit):
        cancel(gen)
        raise
    except Exception as err:
        if is_backpressure(err):
            raise AttemptFailed(
                "backpressure", RateLimited("the self-hosted pool is at capacity"), pool_fault=False, retryable=False
            ) from None
        logger.warning("pool attempt failed before the first token: %s: %s", type(err).__name__, err)
        raise AttemptFailed(
            "error_before_first_token",
            ServiceUnavailable("the self-hosted engine failed"),
            pool_fault=True,
            retryable=True,
        ) from None
    last = items[-1]
    if isinstance(last, ErrorReply) and last.status >= 500:
        cancel(gen)
        message = str((last.body.get("error") or {}).get("message") or "engine error")
        raise AttemptFailed("error_before_first_token", status_error(503, message), pool_fault=True, retryable=True)
    return Head(items)


class Dispatcher:
    """Runs requests for the gateway: decision, pool attempts with retry, spill, then the response."""

    def __init__(self, monitor: PoolMonitor, ledger: Ledger, call_pool: PoolCaller, cfg: GatewayConfig) -> None:
        self.monitor = monitor
        self.ledger = ledger
        self.metrics: Metrics = ledger.metrics
        self.call_pool = call_pool
        self.cfg = cfg
        self.hosted: HostedBackend | None = None
        self.served_names: dict[str, str] = {}
        self.continuable: dict[str, bool] = {}  # Gemini model -> accepts a trailing model turn (probed)
        self.wake: Callable[[str], None] = lambda pool: None  # the gateway asks Serve for a replica

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.cfg.retry_after_s)}

    # ------------------------------------------------------------------------------------ entry point
    async def run(self, rec: RequestRecord, route: RouteConfig, body: dict[str, Any]) -> Response:
        hosted = self.hosted  # one view for the whole request, even if a reconfigure swaps it meanwhile
        hosted_ok, hosted_err = self._hosted_fit(hosted, route, body, rec.kind)
        pool = route.pool
        now = time.monotonic()
        saturated, allows, slo_spill = False, True, False
        slo_ticket: SloTicket | None = None
        if pool is not None and route.policy != "hosted_only":
            saturated = self.monitor.saturated(pool)
            allows = route.policy == "self_hosted_only" or self.monitor.breaker(pool).would_allow(now)
            rec.spill_inputs = self.monitor.explain(pool)
            if route.ttft_slo_ms:
                slo_spill, slo_ticket, inputs = self.monitor.slo.decide(
                    pool,
                    rec.alias,
                    route.ttft_slo_ms / 1000,
                    self.monitor.ready_replicas(pool),
                    self.monitor.pools[pool].inflight,
                    estimate_prompt_tokens(body, rec.kind),
                )
                rec.spill_inputs.update(inputs)
        decision = decide(
            route.policy,
            saturated=saturated or slo_spill,
            breaker_allows=allows,
            hosted_available=hosted is not None and hosted.available,
            hosted_supports_request=hosted_err is None,
        )
        if decision.target == "reject":
            if hosted_err is not None and route.policy == "hosted_only":
                raise hosted_err
            raise ServiceUnavailable(
                "the self-hosted pool is degraded and no hosted model can take the request",
                headers=self.retry_after(),
            )
        if decision.target == GEMINI:
            assert hosted is not None
            rec.spill_reason = "ttft_slo" if decision.reason == "saturated" and not saturated else decision.reason
            if pool is not None and self.monitor.ready_replicas(pool) == 0:
                self.wake(pool)  # a pool at zero (or all down) is woken, not left to Gemini forever
            return await self._via_gemini(rec, route, body, hosted)
        assert pool is not None
        try:
            return await self._via_pool(
                rec, route, pool, body, hosted if hosted_ok and hosted_err is None else None, slo_ticket
            )
        except AttemptFailed as failure:
            if hosted is None or not may_spill_after_failure(route.policy, hosted_ok, hosted_err is None):
                failure.error.headers.update(self.retry_after())
                raise failure.error from None
            rec.spill_reason = failure.reason
            return await self._via_gemini(rec, route, body, hosted)

    @staticmethod
    def _hosted_fit(
        hosted: HostedBackend | None, route: RouteConfig, body: dict[str, Any], kind: str
    ) -> tuple[bool, APIError | None]:
        if route.gemini_model is None or hosted is None:
            return False, ServiceUnavailable("no hosted model is configured for this route")
        if not hosted.available:
            return False, ServiceUnavailable("the hosted model is not configured (missing API key)")
        try:
            hosted.check_supported(body, kind)
        except APIError as err:
            return True, err
        return True, None

    # ------------------------------------------------------------------------------------ self-hosted
    def first_byte_timeout(self, route: RouteConfig, pool: str) -> float:
        """How long a pool attempt may take to its first output.

        A pool at zero replicas (cold start) gets the whole request deadline on a self_hosted_only route:
        the request waits for the replica instead of failing.
        """
        if route.policy == "self_hosted_only" and self.monitor.ready_replicas(pool) == 0:
            return self.cfg.request_timeout_s
        return min(route.breaker.first_token_timeout_s, self.cfg.request_timeout_s)

    async def open_pool(
        self,
        rec: RequestRecord,
        route: RouteConfig,
        pool: str,
        body: dict[str, Any],
        request_id: str,
        slo_ticket: SloTicket | None = None,
    ) -> tuple[Any, Head, Ticket | None]:
        """One attempt: admit, call, read the head. The ticket is settled here on failure."""
        breaker = self.monitor.breaker(pool)
        ticket = breaker.admit(time.monotonic()) if route.policy != "self_hosted_only" else None
        if route.policy != "self_hosted_only" and ticket is None:
            raise AttemptFailed(
                "degraded", ServiceUnavailable("the self-hosted pool is degraded"), pool_fault=False, retryable=False
            )
        state = self.monitor.pools[pool]
        state.inflight += 1
        if slo_ticket is not None:
            self.monitor.slo.sent(slo_ticket)
        try:
            gen = self.call_pool(pool, rec.kind, dict(body), rec.alias, request_id, getattr(route, "lora", None))
            head = await read_head(
                gen, self.first_byte_timeout(route, pool) if rec.stream else self.cfg.request_timeout_s
            )
        except AttemptFailed as failure:
            state.inflight -= 1
            if slo_ticket is not None:
                self.monitor.slo.first_token(slo_ticket, None)
            if ticket is not None:
                breaker.settle(ticket, time.monotonic(), False if failure.pool_fault else None)
            raise
        except BaseException:
            state.inflight -= 1
            if slo_ticket is not None:
                self.monitor.slo.first_token(slo_ticket, None)
            if ticket is not None:
                breaker.settle(ticket, time.monotonic(), None)
            raise
        if slo_ticket is not None:
            first_output = rec.stream and isinstance(head.last, ChunkReply)
            self.monitor.slo.first_token(slo_ticket, time.monotonic() - rec.started if first_output else None)
        return gen, head, ticket

    async def open_pool_retrying(
        self,
        rec: RequestRecord,
        route: RouteConfig,
        pool: str,
        body: dict[str, Any],
        request_id: str,
        slo_ticket: SloTicket | None = None,
        give_up: Callable[[], bool] = lambda: False,
    ) -> tuple[Any, Head, Ticket | None]:
        """open_pool, retried (up to `pool_retries`, with a short backoff) while failures are retryable
        and `give_up()` says no. The last AttemptFailed propagates."""
        attempt = 0
        while True:
            try:
                return await self.open_pool(
                    rec, route, pool, body, request_id if attempt == 0 else f"{request_id}-r{attempt}", slo_ticket
                )
            except AttemptFailed as failure:
                attempt += 1
                if not failure.retryable or attempt > self.cfg.pool_retries or give_up():
                    raise
                rec.retries += 1
                self.metrics.inc("pool_retries", pool=pool, reason=failure.reason)
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)  # let routers learn of a replica that died
                logger.info("request %s: retrying on the pool after %s", rec.request_id, failure.reason)

    async def _via_pool(
        self,
        rec: RequestRecord,
        route: RouteConfig,
        pool: str,
        body: dict[str, Any],
        hosted: HostedBackend | None,
        slo_ticket: SloTicket | None = None,
    ) -> Response:
        self.ledger.set_route(rec, SELF_HOSTED)
        rec.upstream_model = self.served_names.get(pool, pool)
        gen, head, ticket = await self.open_pool_retrying(
            rec,
            route,
            pool,
            body,
            rec.engine_id,
            slo_ticket,
            # no other replica to try: Gemini answers sooner than a replacement starts
            give_up=lambda: route.policy == "spill" and hosted is not None and self.monitor.ready_replicas(pool) <= 1,
        )
        self.metrics.observe("queue_seconds", time.monotonic() - rec.started, model=rec.alias, route=rec.route)
        backend = Backend(SELF_HOSTED, gen, pool=pool, ticket=ticket)
        return self._respond(rec, route, body, head, backend, hosted)

    # ------------------------------------------------------------------------------------ hosted
    async def _via_gemini(
        self, rec: RequestRecord, route: RouteConfig, body: dict[str, Any], hosted: HostedBackend
    ) -> Response:
        assert route.gemini_model is not None
        self.ledger.set_route(rec, GEMINI)
        rec.upstream_model = route.gemini_model
        if rec.spill_reason:
            self.metrics.inc("spill", model=rec.alias, reason=rec.spill_reason)
        gen = open_hosted(hosted, route, body, rec, continue_final_message=False)
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                first: Reply = await gen.__anext__()
        except StopAsyncIteration:
            raise ServiceUnavailable("the hosted model returned nothing", headers=self.retry_after()) from None
        except TimeoutError:
            cancel(gen)
            raise ServiceUnavailable("the hosted model did not answer in time", headers=self.retry_after()) from None
        except APIError as err:
            if err.status in (429, 503):
                err.headers.setdefault("Retry-After", str(self.cfg.retry_after_s))
            raise
        self.metrics.observe("queue_seconds", time.monotonic() - rec.started, model=rec.alias, route=rec.route)
        spilled_from = route.pool if rec.spill_reason else None
        if spilled_from is not None and spilled_from in self.monitor.pools:
            self.monitor.pools[spilled_from].spilled += 1
        backend = Backend(GEMINI, gen, pool=spilled_from)
        return self._respond(rec, route, body, Head([first]), backend, None)

    # ------------------------------------------------------------------------------------ response
    def _respond(
        self,
        rec: RequestRecord,
        route: RouteConfig,
        body: dict[str, Any],
        head: Head,
        backend: Backend,
        hosted: HostedBackend | None,
    ) -> Response:
        last = head.last
        if isinstance(last, ErrorReply | JSONReply):
            backend.settle(self.monitor, True)  # the engine judged the request: that is the engine working
            return json_response(self, rec, last)
        relay = Relay(self, rec, route, body, backend, hosted)
        return stream_response(relay, head.items)


def open_hosted(
    hosted: HostedBackend, route: RouteConfig, body: dict[str, Any], rec: RequestRecord, *, continue_final_message: bool
) -> Any:
    assert route.gemini_model is not None
    hosted_body = dict(body)
    hosted_body["model"] = route.gemini_model
    method = hosted.chat if rec.kind == "chat" else hosted.completion
    return method(
        hosted_body,
        rec.alias,
        rec.request_id,
        thinking_budget=route.gemini_thinking_budget,
        continue_final_message=continue_final_message,
    )


def cancel(gen: Any) -> None:
    """Stop a backend stream now: Ray response generators cancel; async generators are closed."""
    stop: Callable[[], Any] | None = getattr(gen, "cancel", None)
    if stop is not None:
        try:
            stop()
        except Exception:  # already finished
            logger.debug("cancel of a finished stream", exc_info=True)
        return
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        task = asyncio.ensure_future(aclose())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


def is_backpressure(err: BaseException) -> bool:
    """BackPressureError may arrive wrapped (RayTaskError) when raised in another process."""
    from ray.serve.exceptions import BackPressureError

    cause = getattr(err, "cause", None)
    return isinstance(err, BackPressureError) or isinstance(cause, BackPressureError)
