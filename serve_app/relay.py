"""Writing a backend's answer to the client, and continuing a stream whose backend broke.

A stream ends exactly once, whatever happens: the response object's close hook finishes the request
even when the body was never iterated (the client left before the first send). Per chunk the relay does
little: attribute tokens (TTFT, ITL), look for an in-band error event, keep the SSE text for a possible
continuation, and pass the text on. When the self-hosted backend fails after the first byte (replica or
engine died, an in-band error event, no chunk within the idle timeout) the relay continues the answer on
another replica, or on Gemini where the route spills and the model accepts a trailing model turn; the
client sees one uninterrupted stream with the same id, and an SSE comment (ignored by OpenAI clients)
marks the switch. What cannot continue ends with one error event, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.exceptions import TaskCancelledError
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from serve_app import continuation as cont
from serve_app.config import RouteConfig
from serve_app.errors import APIError, error_body
from serve_app.lifecycle import CLIENT_ABORT, RequestRecord
from serve_app.protocol import DONE, ChunkReply, ErrorReply, JSONReply, Reply, split_inband_error, sse_error
from serve_app.routing import Ticket

if TYPE_CHECKING:
    from serve_app.dispatch import Dispatcher, HostedBackend
    from serve_app.pools import PoolMonitor

logger = logging.getLogger(__name__)

_SERVED_BY = {"self_hosted": "self-hosted", "gemini": "gemini"}


@dataclass
class Backend:
    """The stream a request is currently reading, and what it holds (pool in-flight slot, breaker ticket)."""

    kind: str  # self_hosted | gemini
    gen: Any
    pool: str | None = None
    ticket: Ticket | None = None
    settled: bool = False

    def settle(self, monitor: PoolMonitor, ok: bool | None) -> None:
        """Give back what the attempt holds; ok/failed reach the breaker, None is neutral. Once only."""
        if self.settled:
            return
        self.settled = True
        if self.pool is None or self.pool not in monitor.pools:
            return
        state = monitor.pools[self.pool]
        if self.kind == "self_hosted":
            state.inflight -= 1
            if self.ticket is not None:
                state.breaker.settle(self.ticket, time.monotonic(), ok)
        else:
            state.spilled = max(0, state.spilled - 1)


class StreamBroken(Exception):
    def __init__(self, reason: str, status: int, message: str, pool_fault: bool) -> None:
        super().__init__(reason)
        self.reason, self.status, self.message, self.pool_fault = reason, status, message, pool_fault


def headers_for(rec: RequestRecord) -> dict[str, str]:
    headers = {"x-served-by": _SERVED_BY.get(rec.route, rec.route), "x-upstream-model": rec.upstream_model}
    if rec.id_header:
        headers["x-request-id"] = rec.request_id
    if rec.spill_reason:
        headers["x-spill-reason"] = rec.spill_reason
    return headers


def json_response(d: Dispatcher, rec: RequestRecord, reply: ErrorReply | JSONReply) -> Response:
    if isinstance(reply, ErrorReply):
        rec.fail(reply.status)
        headers = headers_for(rec)
        if reply.status in (429, 503):
            headers.update(d.retry_after())
        d.ledger.finish(rec)
        return JSONResponse(reply.body, status_code=reply.status, headers=headers)
    usage = reply.body.get("usage") or {}
    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    rec.completion_tokens = int(usage.get("completion_tokens") or 0)
    d.ledger.finish(rec)
    return JSONResponse(reply.body, headers=headers_for(rec))


class RelayResponse(StreamingResponse):
    """A StreamingResponse whose close hook runs however the response ends (sent, cancelled, never started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TaskCancelledError:
            # Ray's proxy cancelled the request (the client left): Starlette's disconnect listener sees
            # it from receive(). A client abort, not an error: the close hook records it.
            pass
        finally:
            self._on_close()


def stream_response(relay: Relay, head: list[Reply]) -> Response:
    return RelayResponse(relay.body(head), relay.close, headers_for(relay.rec))


class Relay:
    def __init__(
        self,
        d: Dispatcher,
        rec: RequestRecord,
        route: RouteConfig,
        body: dict[str, Any],
        backend: Backend,
        hosted: HostedBackend | None,
    ) -> None:
        self.d, self.rec, self.route, self.request, self.backend, self.hosted = d, rec, route, body, backend, hosted
        self.refused = cont.refusal(body, rec.kind) if backend.kind == "self_hosted" else "hosted"
        can_continue = self.refused is None and d.cfg.max_continuations > 0
        self.sent: list[str] | None = [] if can_continue else None
        self.produced = 0  # completion tokens the client has received
        self.produced_before = 0  # ... before the current continuation segment
        self.continuations = 0
        self.rewrite: Callable[[str], str] | None = None
        self.last = time.monotonic()

    # ------------------------------------------------------------------------------------ per chunk
    def _emit(self, item: ChunkReply) -> str | None:
        rec = self.rec
        if item.tokens:
            now = time.monotonic()
            self.produced += item.tokens
            if self.backend.kind == "gemini" and self.backend.pool is not None:
                state = self.d.monitor.pools.get(self.backend.pool)
                if state is not None:
                    state.spilled_tokens += item.tokens
            labels = {"model": rec.alias, "route": rec.route}
            if rec.ttft_s is None:
                rec.ttft_s = now - rec.started
                self.d.metrics.observe("ttft_seconds", rec.ttft_s, **labels)
            else:
                # One observation per chunk (no per-token loop on the hot path): the per-token gap. A chunk
                # carries one token unless the replica merged tokens that piled up behind a slow path.
                self.d.metrics.observe("itl_seconds", (now - self.last) / item.tokens, **labels)
            self.last = now
        data = item.data
        if self.rewrite is not None:
            data = self.rewrite(data)
        if item.usage is not None:
            usage = item.usage
            if self.continuations:
                usage = cont.merged_usage(usage, self.produced_before)
                data = cont.with_usage(data, usage)
            rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            rec.completion_tokens = int(usage.get("completion_tokens") or 0)
        if item.usage_only or not data:
            return None
        if self.sent is not None:
            self.sent.append(data)
        return data

    async def _pump(self) -> AsyncIterator[str]:
        gen = self.backend.gen
        idle = self.d.cfg.stream_idle_timeout_s
        while True:
            try:
                async with asyncio.timeout(idle):
                    item: Reply = await gen.__anext__()
            except StopAsyncIteration:
                return
            except TimeoutError:
                from serve_app.dispatch import cancel

                cancel(gen)
                raise StreamBroken("idle_timeout", 504, f"no output for {idle:g} s", True) from None
            except APIError as err:
                raise StreamBroken("upstream_error", err.status, err.message, err.status >= 500) from None
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as err:
                logger.warning("request %s: backend failed mid-stream: %s", self.rec.request_id, type(err).__name__)
                raise StreamBroken("backend_failed", 502, "the backend failed mid-stream", True) from None
            if isinstance(item, ErrorReply):
                raise StreamBroken("error_event", item.status, _message(item), item.status >= 500)
            if isinstance(item, JSONReply):
                continue  # cannot happen in a stream; never forwarded raw
            before, event = split_inband_error(item)
            if before is not None:
                text = self._emit(before)
                if text:
                    yield text
            if event is not None:
                raise StreamBroken("error_event", event.status, _message(event), event.status >= 500)

    # ------------------------------------------------------------------------------------ the body
    async def body(self, head: list[Reply]) -> AsyncIterator[str]:
        rec = self.rec
        try:
            for item in head:
                if isinstance(item, ChunkReply):
                    text = self._emit(item)
                    if text:
                        yield text
            while True:
                try:
                    async for text in self._pump():
                        yield text
                    self.backend.settle(self.d.monitor, True)
                    if self.backend.kind == "self_hosted" and self.backend.pool is not None:
                        self.d.monitor.slo.finished(self.backend.pool, rec.completion_tokens)
                    break
                except StreamBroken as broken:
                    self.backend.settle(self.d.monitor, False if broken.pool_fault else None)
                    resumed = await self._continue(broken)
                    if resumed is None:
                        rec.fail(broken.status)
                        yield sse_error(broken.status, error_body(broken.message, "server_error", None, broken.status))
                        break
                    for text in resumed:
                        yield text
        except (asyncio.CancelledError, GeneratorExit):
            self.abort()
            raise
        finally:
            self.close()
        yield DONE

    def abort(self) -> None:
        if not self.rec.finished:
            self.rec.fail(499, CLIENT_ABORT)

    def close(self) -> None:
        """Runs on every exit (also when the body never started): release, settle neutral, finish once."""
        rec = self.rec
        if rec.finished:
            return
        if not self.backend.settled:
            from serve_app.dispatch import cancel

            cancel(self.backend.gen)
            self.backend.settle(self.d.monitor, None)
            if rec.outcome == "ok" and rec.status == 200:
                rec.fail(499, CLIENT_ABORT)
        self.d.ledger.finish(rec)

    # ------------------------------------------------------------------------------------ continuation
    async def _continue(self, broken: StreamBroken) -> list[str] | None:
        """Start the rest of the answer elsewhere; the texts to send first, or None when it cannot go on."""
        if self.sent is None or self.continuations >= self.d.cfg.max_continuations:
            self._count_refused(broken)
            return None
        partial = cont.replay(self.sent)
        next_body = cont.continuation_body(self.request, self.rec.kind, partial, self.produced)
        if next_body is None:
            self._count_refused(broken, "nothing_left")
            return None
        self.continuations += 1
        request_id = f"{self.rec.engine_id}-c{self.continuations}"
        started = time.monotonic()
        resumed = await self._continue_on_pool(next_body, request_id, partial)
        target = "self_hosted"
        if resumed is None:
            resumed = await self._continue_on_gemini(next_body, partial)
            target = "gemini"
        if resumed is None:
            self.d.metrics.inc("failover", 1.0, **{"from": "self_hosted", "to": "none", "reason": broken.reason})
            return None
        self.d.metrics.inc("failover", 1.0, **{"from": "self_hosted", "to": target, "reason": broken.reason})
        self.d.metrics.observe("failover_stall_seconds", time.monotonic() - started, model=self.rec.alias)
        self.rec.failovers.append(f"self_hosted->{target}:{broken.reason}")
        marker = f": serve_app failover self_hosted->{target} reason={broken.reason}\n\n"
        return [marker, *resumed]

    def _count_refused(self, broken: StreamBroken, why: str | None = None) -> None:
        """A broken stream that ends with an error event: counted as failover to=none, reason logged."""
        if self.backend.kind != "self_hosted" or not broken.pool_fault:
            return
        self.rec.failovers.append(f"refused:{why or self.refused or 'limit'}")
        self.d.metrics.inc("failover", 1.0, **{"from": "self_hosted", "to": "none", "reason": broken.reason})

    def _start_segment(self, first_data: str, partial: cont.Partial) -> None:
        new_id, new_created = cont.first_ids(first_data)
        self.rewrite = cont.rewriter(partial, new_id, new_created)
        self.produced_before = self.produced

    async def _continue_on_pool(self, body: dict[str, Any], request_id: str, partial: cont.Partial) -> list[str] | None:
        from serve_app.dispatch import AttemptFailed

        pool = self.route.pool
        if pool is None or self.route.policy == "hosted_only":
            return None
        try:  # a dead replica may be picked again: retried like a first attempt
            gen, head, ticket = await self.d.open_pool_retrying(self.rec, self.route, pool, body, request_id)
        except AttemptFailed as failure:
            logger.info("request %s: continuation on the pool failed: %s", self.rec.request_id, failure.reason)
            return None
        last = head.last
        if not isinstance(last, ChunkReply):
            from serve_app.dispatch import cancel

            cancel(gen)
            Backend("self_hosted", gen, pool=pool, ticket=ticket).settle(self.d.monitor, None)
            return None
        self.backend = Backend("self_hosted", gen, pool=pool, ticket=ticket)
        self._start_segment(last.data, partial)
        texts = [self._emit(last)]  # role-only head chunks of the continuation are not resent
        return [t for t in texts if t]

    async def _continue_on_gemini(self, body: dict[str, Any], partial: cont.Partial) -> list[str] | None:
        hosted, model = self.hosted, self.route.gemini_model
        if self.route.policy != "spill" or hosted is None or model is None or not self.d.continuable.get(model):
            return None
        from serve_app.dispatch import AttemptFailed, cancel, open_hosted, read_head

        if self.rec.kind == "completion":  # Gemini takes the prompt and the partial answer apart
            prompt = self.request.get("prompt")
            body = {**body, "prompt": [prompt[0] if isinstance(prompt, list) else prompt, partial.text]}
        gen = open_hosted(hosted, self.route, body, self.rec, continue_final_message=True)
        try:  # the same first-output rule as for the pool: role-only chunks wait, errors fail
            head = await read_head(gen, self.route.breaker.first_token_timeout_s)
        except AttemptFailed as failure:  # Gemini cannot take it either
            cancel(gen)
            logger.info("request %s: continuation on Gemini failed: %s", self.rec.request_id, failure.reason)
            return None
        first = head.last
        if not isinstance(first, ChunkReply):
            cancel(gen)
            return None
        self.d.ledger.set_route(self.rec, "gemini")
        self.rec.upstream_model = model
        pool = self.route.pool
        if pool is not None and pool in self.d.monitor.pools:
            self.d.monitor.pools[pool].spilled += 1
        self.backend = Backend("gemini", gen, pool=pool)
        self._start_segment(first.data, partial)
        text = self._emit(first)
        return [text] if text else []


def _message(err: ErrorReply) -> str:
    inner = err.body.get("error")
    if isinstance(inner, dict):
        return str(inner.get("message") or "engine error")
    return "engine error"
