"""The hosted overflow: Gemini through the official google-genai SDK, rendered as OpenAI responses.

This is the only module that imports google.genai. Translation lives in gemini_translate (requests) and
gemini_render (responses), both pure. Calls yield the same `Reply` items as the self-hosted engines; the
first upstream call happens before the first yield (the SDK's stream is lazy, so the first event is pulled
here), which lets the gateway decide about a request before it sends its first byte.

Errors are raised from the generators as `serve_app.errors.APIError`s: 429 → RateLimited (with
Retry-After), 5xx / timeouts / connection failures → ServiceUnavailable, 400 → BadRequest with Gemini's
message, and credential (401/403, invalid key) or unknown-model (404) failures → ServiceUnavailable,
because they are our configuration's fault, not the client's. The API key never appears in messages or logs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import AsyncGenerator
from contextvars import ContextVar
from typing import Any

import aiohttp
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from serve_app import errors
from serve_app.config import GeminiConfig
from serve_app.gemini_render import Kind, StreamRenderer, render
from serve_app.gemini_translate import GeminiRequest, build_request, check_supported
from serve_app.protocol import JSONReply, Reply, wants_usage

logger = logging.getLogger(__name__)

BASE_URL_ENV = "GEMINI_BASE_URL"
_REDACTED = "[redacted]"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


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
            timeout=max(1, int(cfg.timeout_s * 1000)),
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

    def chat(self, body: dict[str, Any], alias: str, request_id: str) -> AsyncGenerator[Reply, None]:
        return self._generate(body, "chat", alias, request_id)

    def completion(self, body: dict[str, Any], alias: str, request_id: str) -> AsyncGenerator[Reply, None]:
        return self._generate(body, "completion", alias, request_id)

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
        self, body: dict[str, Any], kind: Kind, alias: str, request_id: str
    ) -> AsyncGenerator[Reply, None]:
        client = self._client
        if client is None:
            raise errors.ServiceUnavailable("hosted model not configured")
        if self._closing:
            raise errors.ServiceUnavailable("the hosted model settings are being replaced; retry")
        req = build_request(body, kind)
        self._inflight += 1
        try:
            # aclosing: when the gateway closes us early, everything below closes now, not at GC.
            async with contextlib.aclosing(self._call(client, req, body, kind, alias, request_id)) as items:
                async for item in items:
                    yield item
        finally:
            self._inflight -= 1
            if self._closing and self._inflight == 0:
                await self._release()

    async def _call(
        self, client: genai.Client, req: GeminiRequest, body: dict[str, Any], kind: Kind, alias: str, request_id: str
    ) -> AsyncGenerator[Reply, None]:
        if not body.get("stream"):
            try:
                resp = await client.aio.models.generate_content(
                    model=req.model,
                    contents=req.contents,  # type: ignore[arg-type]
                    config=_sdk_config(req),  # type: ignore[arg-type]
                )
            except Exception as err:
                raise self._map_error(err, req.model) from None
            yield JSONReply(render(_dump(resp), kind, alias, request_id))
            return
        renderer = StreamRenderer(kind, alias, request_id, include_usage=wants_usage(body))
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
                first = await anext(stream, None)  # the HTTP request happens here (the SDK is lazy)
            finally:
                _STREAM_RESPONSES.reset(token)
            if first is None:
                return
            yield _dump(first)
            async for resp in stream:
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


def map_upstream_error(
    code: int,
    status: str | None,
    message: str,
    details: Any,
    *,
    model: str,
    retry_after_s: int,
    retry_after_header: str | None = None,
) -> errors.APIError:
    """The APIError for a Gemini HTTP error (code, status, message, raw error JSON)."""
    label = f"HTTP {code}{' ' + status if status else ''}"
    if code == 429:
        delay = _retry_delay(details, retry_after_header)
        seconds = delay if delay is not None else retry_after_s
        return errors.RateLimited(
            f"the hosted model is rate-limited ({label}); retry after {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    if code in (401, 403) or (code == 400 and _is_key_error(status, message, details)):
        return errors.ServiceUnavailable(f"the hosted model rejected the gateway's credentials ({label})")
    if code == 404:
        return errors.ServiceUnavailable(f"hosted model {model!r} is not available upstream ({label})")
    if code == 408 or code >= 500 or code == 0:
        return errors.ServiceUnavailable(f"the hosted model is unavailable ({label})")
    detail = message or "no message"
    return errors.BadRequest(f"the hosted model rejected the request ({label}): {detail}")


def _is_key_error(status: str | None, message: str, details: Any) -> bool:
    # Gemini reports a wrong key as 400 INVALID_ARGUMENT with reason API_KEY_INVALID in its details.
    reasons = {d.get("reason") for d in _detail_items(details)}
    return bool(reasons & {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED"}) or "api key" in message.lower()


def _retry_delay(details: Any, header: str | None) -> int | None:
    """Seconds from google.rpc.RetryInfo (`"retryDelay": "17s"`) or an HTTP Retry-After header."""
    for item in _detail_items(details):
        if str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return max(1, math.ceil(float(match.group(1))))
    if header and header.strip().isdigit():
        return max(1, int(header.strip()))
    return None


def _detail_items(details: Any) -> list[dict[str, Any]]:
    err = details.get("error", details) if isinstance(details, dict) else None
    items = err.get("details") if isinstance(err, dict) else None
    return [d for d in items if isinstance(d, dict)] if isinstance(items, list) else []


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
    return {**req.config, "automatic_function_calling": {"disable": True}}


def _dump(resp: genai_types.GenerateContentResponse) -> dict[str, Any]:
    return resp.model_dump(mode="json", exclude_none=True)
