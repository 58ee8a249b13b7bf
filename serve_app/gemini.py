"""The hosted overflow: Gemini through the official google-genai SDK, rendered as OpenAI responses.

This is the only module that imports google.genai. Translation lives in gemini_translate (requests) and
gemini_render (responses), both pure. Calls yield the same `Reply` items as the self-hosted engines; the
first upstream call happens before the first yield (the SDK's stream is lazy, so the first event is pulled
here), which lets the gateway decide about a request before it sends its first byte.

Timeouts: a non-streaming call (and a probe) has a deadline for the whole call (`timeout_s`, the SDK's
per-call HttpOptions.timeout). A stream has no whole-call deadline, which would cut long answers: the first
event must come within `timeout_s`, and each later one within `stream_idle_timeout_s` of the previous one.
A stream that ends without a finish reason is an error, never a `stop`.

Start-up probes (`probe`, `probe_continuation`) make one tiny call each and never raise; the gateway logs
and exports their `ModelProbe`. Mid-stream failover continues a partial answer through `chat`/`completion`
with `continue_final_message=True` (see gemini_translate).

Errors are raised from the generators as `serve_app.errors.APIError`s: 429 → RateLimited (with
Retry-After), 5xx / timeouts / connection failures → ServiceUnavailable, 400 → BadRequest with Gemini's
message, and credential (401/403, invalid key) or unknown-model (404) failures → ServiceUnavailable,
because they are our configuration's fault, not the client's. The API key never appears in messages or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from serve_app import errors
from serve_app.config import GeminiConfig
from serve_app.gemini_render import Kind, StreamRenderer, map_upstream_error, render
from serve_app.gemini_translate import GeminiRequest, build_request, check_supported
from serve_app.protocol import JSONReply, Reply, wants_usage

logger = logging.getLogger(__name__)

BASE_URL_ENV = "GEMINI_BASE_URL"
_REDACTED = "[redacted]"
PROBE_TIMEOUT_S = 10.0
_PROBE_PROMPT = "Reply with the word OK."


@dataclass(frozen=True)  # no slots: callers read it with vars() / dataclasses.asdict()
class ModelProbe:
    """The outcome of one start-up probe of a Gemini model (`GeminiBackend.probe`)."""

    model: str
    ok: bool  # the model answered a 1-token call
    status: int | None  # the HTTP status (200 when ok); None: no HTTP answer (timeout, connection, not configured)
    message: str  # "ok" or why not, without secrets
    continuable: bool | None  # accepts a trailing `model` turn; None: not checked / unknown
    checked_at: float  # time.time() of the check


# The HTTP responses opened while pulling the first event of a stream (see GeminiBackend._events).
_STREAM_RESPONSES: ContextVar[list[aiohttp.ClientResponse] | None] = ContextVar("gemini_stream_responses", default=None)


async def _track_response(req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """aiohttp client middleware: remember the response for the stream being opened in this context."""
    resp = await handler(req)
    bucket = _STREAM_RESPONSES.get()
    if bucket is not None:
        bucket.append(resp)
    return resp


class GeminiBackend:
    """One google-genai client for the gateway replica, built from the live `GeminiConfig`."""

    def __init__(self, cfg: GeminiConfig) -> None:
        self.cfg = cfg
        self.base_url = os.environ.get(BASE_URL_ENV) or cfg.base_url
        self._key = os.environ.get(cfg.api_key_env) or None
        self._client: genai.Client | None = None
        self.available = False  # a plain attribute: the gateway's HostedBackend protocol declares one
        self._inflight = 0
        self._closing = False
        if self._key is None:
            logger.warning("Gemini is not configured: environment variable %s is not set", cfg.api_key_env)
            return
        http_options = genai_types.HttpOptions(
            base_url=self.base_url,
            api_version=cfg.api_version,
            # No client-wide timeout: with aiohttp it would be a deadline for the whole call, streams included.
            # Non-streaming calls set one per call; streams are timed per event (see _events).
            timeout=None,
            # Explicit retry options also switch off the SDK's hidden 1-10 s connection retry, which
            # would otherwise sit between a client and its spill decision.
            retry_options=genai_types.HttpRetryOptions(attempts=cfg.connect_retries + 1),
            async_client_args={"middlewares": (_track_response,)},
        )
        self._client = genai.Client(api_key=self._key, vertexai=False, http_options=http_options)
        self.available = True

    def __repr__(self) -> str:
        return f"GeminiBackend(available={self.available}, base_url={self.base_url!r})"

    def check_supported(self, body: dict[str, Any], kind: str) -> None:
        """Raise errors.BadRequest(param=...) for request features the Gemini path cannot honour."""
        check_supported(body, "chat" if kind == "chat" else "completion")

    def chat(
        self,
        body: dict[str, Any],
        alias: str,
        request_id: str,
        *,
        thinking_budget: int | None = None,
        continue_final_message: bool = False,
    ) -> AsyncGenerator[Reply, None]:
        """An OpenAI chat answer from Gemini.

        thinking_budget: the route's override (None: `GeminiConfig.thinking_budget`). continue_final_message:
        the messages end with an assistant message holding a partial answer; it becomes a trailing `model`
        turn and only the text after it comes back (a stream's first chunk then carries no role).
        """
        return self._generate(body, "chat", alias, request_id, thinking_budget, continue_final_message)

    def completion(
        self,
        body: dict[str, Any],
        alias: str,
        request_id: str,
        *,
        thinking_budget: int | None = None,
        continue_final_message: bool = False,
    ) -> AsyncGenerator[Reply, None]:
        """An OpenAI text completion from Gemini; to continue, `prompt` is [original prompt, partial answer]."""
        return self._generate(body, "completion", alias, request_id, thinking_budget, continue_final_message)

    # ----------------------------------------------------------------------------------- probes
    async def probe(
        self, model: str, *, thinking_budget: int | None = None, timeout_s: float = PROBE_TIMEOUT_S
    ) -> ModelProbe:
        """One 1-token call to `model` (with the thinking budget spills use); if it answers, also check
        whether it accepts a trailing `model` turn. Never raises; takes at most about 2 x timeout_s."""
        budget = self.cfg.thinking_budget if thinking_budget is None else thinking_budget
        contents = [{"role": "user", "parts": [{"text": _PROBE_PROMPT}]}]
        status, message = await self._probe_call(model, contents, budget, timeout_s)
        if status != 200:
            logger.warning("Gemini model %s failed its start-up probe: %s", model, message)
            return ModelProbe(model, False, status, message, None, time.time())
        continuable = await self._continuation_check(model, budget, timeout_s)
        return ModelProbe(model, True, status, message, continuable, time.time())

    async def probe_continuation(self, model: str, *, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Whether `model` answered a tiny request ending in a `model` turn (False on a 400 rejection and on
        any other failure: a model we could not check is not used to continue). Never raises."""
        return await self._continuation_check(model, self.cfg.thinking_budget, timeout_s) is True

    async def _continuation_check(self, model: str, budget: int | None, timeout_s: float) -> bool | None:
        contents = [
            {"role": "user", "parts": [{"text": _PROBE_PROMPT}]},
            {"role": "model", "parts": [{"text": "O"}]},
        ]
        status, message = await self._probe_call(model, contents, budget, timeout_s)
        if status == 200:
            return True
        if status == 400:
            logger.warning("Gemini model %s rejects a trailing model turn (no continuation): %s", model, message)
            return False
        logger.warning("Gemini model %s: continuation support unknown: %s", model, message)
        return None

    async def _probe_call(
        self, model: str, contents: list[dict[str, Any]], budget: int | None, timeout_s: float
    ) -> tuple[int | None, str]:
        """(HTTP status or None, message) of one 1-token non-streaming call."""
        client = self._client
        if client is None or self._closing:
            return None, "hosted model not configured"
        thinking = {"thinking_config": {"thinking_budget": budget}} if budget is not None else {}
        config = _sdk_config(GeminiRequest(model, contents, {"max_output_tokens": 1, **thinking}))
        config["http_options"] = {"timeout": max(1, int(timeout_s * 1000))}
        try:
            async with asyncio.timeout(timeout_s + 1):  # belt and braces over the SDK's own deadline
                await client.aio.models.generate_content(model=model, contents=contents, config=config)  # type: ignore[arg-type]
        except genai_errors.APIError as err:
            return int(err.code or 0) or None, f"HTTP {err.code} {err.status or ''}: {self._scrub(err.message or '')}"
        except TimeoutError:
            return None, f"no answer within {timeout_s:g} s"
        except Exception as err:  # connection refused, DNS, malformed answers: report, never raise
            return None, f"{type(err).__name__}: {self._scrub(str(err))[:200]}"
        return 200, "ok"

    async def close(self) -> None:
        """Take no new calls; release the client now, or when the last call in flight ends.

        The gateway replaces the backend on a live config change: streams already running on this one
        finish on it instead of being cut off.
        """
        self.available = False
        self._closing = True
        if self._inflight == 0:
            await self._release()

    async def _release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aio.aclose()
            client.close()

    # ----------------------------------------------------------------------------------- calls
    async def _generate(
        self,
        body: dict[str, Any],
        kind: Kind,
        alias: str,
        request_id: str,
        thinking_budget: int | None,
        continuation: bool,
    ) -> AsyncGenerator[Reply, None]:
        client = self._client
        if client is None:
            raise errors.ServiceUnavailable("hosted model not configured")
        if self._closing:
            raise errors.ServiceUnavailable("the hosted model settings are being replaced; retry")
        budget = self.cfg.thinking_budget if thinking_budget is None else thinking_budget
        req = build_request(body, kind, thinking_budget=budget, continue_final_message=continuation)
        self._inflight += 1
        try:
            # aclosing: when the gateway closes us early, everything below closes now, not at GC.
            calls = self._call(client, req, body, kind, alias, request_id, continuation)
            async with contextlib.aclosing(calls) as items:
                async for item in items:
                    yield item
        finally:
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                await self._release()

    async def _call(
        self,
        client: genai.Client,
        req: GeminiRequest,
        body: dict[str, Any],
        kind: Kind,
        alias: str,
        request_id: str,
        continuation: bool,
    ) -> AsyncGenerator[Reply, None]:
        if not body.get("stream"):
            config = _sdk_config(req) | {"http_options": {"timeout": max(1, int(self.cfg.timeout_s * 1000))}}
            try:
                resp = await client.aio.models.generate_content(
                    model=req.model,
                    contents=req.contents,  # type: ignore[arg-type]
                    config=config,  # type: ignore[arg-type]
                )
            except Exception as err:
                raise self._map_error(err, req.model) from None
            yield JSONReply(render(_dump(resp), kind, alias, request_id))
            return
        renderer = StreamRenderer(kind, alias, request_id, include_usage=wants_usage(body), continuation=continuation)
        async with contextlib.aclosing(self._events(client, req)) as upstream:
            async for event in upstream:
                chunk = renderer.feed(event)
                if chunk is not None:
                    yield chunk
        for chunk in renderer.close():
            yield chunk

    async def _events(self, client: genai.Client, req: GeminiRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Upstream stream events as plain dicts; every failure comes out as an errors.APIError."""
        stream: Any = None
        responses: list[aiohttp.ClientResponse] = []
        try:
            stream = await client.aio.models.generate_content_stream(
                model=req.model,
                contents=req.contents,  # type: ignore[arg-type]
                config=_sdk_config(req),  # type: ignore[arg-type]
            )
            token = _STREAM_RESPONSES.set(responses)
            try:
                async with asyncio.timeout(self.cfg.timeout_s):
                    first = await anext(stream, None)  # the HTTP request happens here (the SDK is lazy)
            finally:
                _STREAM_RESPONSES.reset(token)
            if first is None:
                return
            yield _dump(first)
            while True:
                try:
                    async with asyncio.timeout(self.cfg.stream_idle_timeout_s):
                        resp = await anext(stream, None)
                except TimeoutError:
                    idle = self.cfg.stream_idle_timeout_s
                    logger.warning("Gemini stream from %s stalled: no event for %.1f s", req.model, idle)
                    raise errors.ServiceUnavailable(
                        f"the hosted model's stream stalled (no event for {idle:g} s)"
                    ) from None
                if resp is None:
                    return
                yield _dump(resp)
        except Exception as err:
            raise self._map_error(err, req.model) from None
        finally:
            if stream is not None:
                await stream.aclose()
            # The SDK's nested stream generators only release their HTTP response when garbage-collected
            # (a reference cycle), so a stream we leave early (client gone, mid-stream error) would keep
            # Gemini generating. Closing the response drops the connection now; after a complete read
            # the response is already released and this does nothing.
            for response in responses:
                response.close()

    # ----------------------------------------------------------------------------------- errors
    def _map_error(self, err: Exception, model: str) -> errors.APIError:
        if isinstance(err, errors.APIError):
            return err
        if isinstance(err, genai_errors.APIError):
            mapped = map_upstream_error(
                int(err.code or 0),
                err.status,
                self._scrub(err.message or ""),
                err.details,
                model=model,
                retry_after_s=self.cfg.retry_after_s,
                retry_after_header=_header(err, "Retry-After"),
            )
            logger.warning(
                "Gemini call to %s failed: HTTP %s %s -> %s", model, err.code, err.status, type(mapped).__name__
            )
            return mapped
        if isinstance(err, TimeoutError):
            logger.warning("Gemini call to %s timed out after %.1f s", model, self.cfg.timeout_s)
            return errors.ServiceUnavailable(f"the hosted model did not answer within {self.cfg.timeout_s:g} s")
        if isinstance(err, aiohttp.ClientError | OSError):
            logger.warning("Gemini call to %s failed: %s", model, type(err).__name__)
            return errors.ServiceUnavailable("cannot reach the hosted model")
        # Anything else is unexpected (a malformed response, an SDK change): log the stack, since
        # tracebacks carry no request headers, and answer 503 so the request can go elsewhere.
        logger.error("Gemini call to %s failed unexpectedly: %s", model, type(err).__name__, exc_info=err)
        return errors.ServiceUnavailable("the hosted model failed")

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, _REDACTED) if self._key else text


def _header(err: genai_errors.APIError, name: str) -> str | None:
    headers = getattr(err.response, "headers", None)
    try:
        value = headers.get(name) if headers is not None else None
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _sdk_config(req: GeminiRequest) -> dict[str, Any]:
    # We never pass tools, so the SDK's automatic-function-calling loop has nothing to do; switching it off
    # keeps the plain request path (and its per-call INFO log line) out of the way.
    # (google-genai 3.6 sends thinkingConfig's inner keys in snake_case, thinking_budget; Gemini's JSON
    # parser accepts both spellings, as proto3 JSON does.)
    return {**req.config, "automatic_function_calling": {"disable": True}}


def _dump(resp: genai_types.GenerateContentResponse) -> dict[str, Any]:
    return resp.model_dump(mode="json", exclude_none=True)
