"""An ASGI middleware for Ray Serve's HTTP proxy: client-controlled proxy headers can't cause a 500.

Ray 2.60's proxy reads a few headers itself before the app sees the request, decoding them with
`bytes.decode()`: a value that is not UTF-8 (`x-request-id: \\xe9`) makes the proxy answer a plain-text
500. It also obeys `x-request-timeout-seconds`, so a client could pick (or switch off) the proxy's
timeout. This middleware runs in the proxy (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH points at
`middlewares`): it answers such requests with an OpenAI-shaped 400 and drops the timeout header.
`serve-app run`, the tests and the KubeRay manifests set that variable wherever Ray starts.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.middleware import Middleware

ENV_VAR = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
IMPORT_PATH = "serve_app.proxy_guard:middlewares"

_DECODED_BY_PROXY = frozenset(
    {
        b"x-request-id",
        b"x-session-id",
        b"serve_multiplexed_model_id",
        b"serve-multiplexed-model-id",
        b"x-request-disconnect-disabled",
    }
)
_NOT_FOR_CLIENTS = frozenset({b"x-request-timeout-seconds"})


class ProxyHeaderGuard:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            headers = []
            for key, value in scope.get("headers", []):
                name = key.lower()
                if name in _NOT_FOR_CLIENTS:
                    continue
                if name in _DECODED_BY_PROXY:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        await _bad_request(send, f"header {name.decode('latin-1')!r} must be UTF-8 text")
                        return
                headers.append((key, value))
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


async def _bad_request(send: Any, message: str) -> None:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 400, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list[Middleware]:
    """What Ray's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyHeaderGuard)]
