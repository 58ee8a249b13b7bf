"""The gateway's checks on an incoming HTTP request, and how its errors are rendered.

Pure functions of the request (no Ray, no routing): client keys, body size, JSON shape, the request id.
A client's mistake always becomes an OpenAI-shaped 4xx here, never a 500: malformed or deeply nested
JSON, lone surrogates, wrong types of the fields the gateway itself reads.
"""

from __future__ import annotations

import hmac
import json
import os
import uuid
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from serve_app.errors import APIError, BadRequest, PayloadTooLarge, Unauthorized
from serve_app.lifecycle import RequestRecord


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate a client sent can never break rendering."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(err: APIError, headers: dict[str, str] | None = None, retry_after_s: int = 2) -> Response:
    merged = {**(headers or {}), **err.headers}
    if err.status in (429, 503):
        merged.setdefault("Retry-After", str(retry_after_s))
    return SafeJSONResponse(err.body(), status_code=err.status, headers=merged)


def load_api_keys(env_name: str | None) -> list[str] | None:
    """Client API keys from the named env var; None when auth is off (not configured)."""
    if not env_name:
        return None
    keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
    if not keys:
        raise ValueError(f"gateway.api_keys_env names {env_name}, but that environment variable holds no keys")
    return keys


def check_auth(authorization: str | None, keys: list[str] | None) -> None:
    if keys is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.strip().encode(), k.encode()) for k in keys):
        raise Unauthorized("invalid API key")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def load_json(raw: bytes) -> Any:
    """The body's JSON value, or a 400: malformed JSON, invalid UTF-8, nesting deeper than Python's
    recursion limit, an integer of more than 4300 digits (ValueError), a lone surrogate escape."""
    try:
        body = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, the int digits limit
        raise BadRequest(f"malformed JSON body: {err}") from None
    except RecursionError:
        raise BadRequest("malformed JSON body: nested too deeply") from None
    if b"\\u" in raw:  # only an escape can smuggle in a lone surrogate; a real one fails decoding above
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("request body holds an invalid unicode escape (a lone surrogate)") from None
        except RecursionError:
            raise BadRequest("malformed JSON body: nested too deeply") from None
    return body


def parse_request(raw: bytes, kind: str) -> dict[str, Any]:
    """JSON object with the fields the gateway itself needs; the engine validates the rest."""
    body = load_json(raw)
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' is required and must be a non-empty array", param="messages")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                raise BadRequest("each message must be an object with a 'role'", param=f"messages.{i}")
    elif "prompt" not in body:
        raise BadRequest("'prompt' is required", param="prompt")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    return body


def request_id_from(given: str | None) -> str:
    """The client's X-Request-Id when it is a sane token, else a fresh one."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


def id_header(rec: RequestRecord) -> dict[str, str]:
    return {"x-request-id": rec.request_id} if rec.id_header else {}
