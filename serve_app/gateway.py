"""The Gateway deployment: the FastAPI ingress. Auth, body checks, the route table, then the Dispatcher.

Routes and Gemini settings arrive through `reconfigure(user_config)`, so `serve deploy` of a changed
route table reconfigures the gateway live without touching the engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from serve_app.config import ConfigError, GatewayConfig, GeminiConfig, RouteConfig, parse_live_config
from serve_app.dispatch import Dispatcher, RequestRecord, outcome_for_status
from serve_app.errors import APIError, BadRequest, NotFound, PayloadTooLarge, Unauthorized, error_body
from serve_app.loadboard import get_board
from serve_app.metrics import Metrics
from serve_app.pools import PoolMonitor

logger = logging.getLogger(__name__)

api = FastAPI(title="serve_app", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(err.detail), kind, None, err.status_code), status_code=err.status_code)


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> Response:
    logger.exception("unexpected error: %s", type(err).__name__)
    return JSONResponse(error_body("internal error", "server_error", None, 500), status_code=500)


# ------------------------------------------------------------------------------------ request checks
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


def parse_request(raw: bytes, kind: str) -> dict[str, Any]:
    """JSON object with the fields the gateway itself needs; the engine validates the rest."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"malformed JSON body: {err}") from None
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


def models_list(routes: dict[str, RouteConfig], created: int) -> dict[str, Any]:
    data = [
        {"id": alias, "object": "model", "created": created, "owned_by": "serve_app", "policy": r.policy}
        for alias, r in sorted(routes.items())
    ]
    return {"object": "list", "data": data}


# ------------------------------------------------------------------------------------ the deployment
@serve.deployment
@serve.ingress(api)
class Gateway:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, pools: dict[str, Any], served_names: dict[str, str], gateway: dict[str, Any]
    ) -> None:
        self._cfg = GatewayConfig.model_validate(gateway)
        self._handles = pools
        self._keys = load_api_keys(self._cfg.api_keys_env)
        if self._keys is None:
            logger.warning(
                "API key auth is OFF (gateway.api_keys_env not set): anyone who reaches this port can call it"
            )
        self._metrics = Metrics()
        self._monitor = PoolMonitor()
        self._dispatch = Dispatcher(self._monitor, self._metrics, self._call_pool, self._cfg.retry_after_s)
        self._dispatch.served_names = dict(served_names)
        self._routes: dict[str, RouteConfig] = {p: RouteConfig(pool=p) for p in pools}
        self._monitor.configure(self._routes)
        self._gemini_cfg: GeminiConfig | None = None
        self._created = int(time.time())
        try:
            self._board: Any = get_board(serve.get_replica_context().app_name)
        except Exception:
            self._board = None
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the live part of the config: the route table and the Gemini settings."""
        live = parse_live_config(user_config)
        routes = dict(live.routes)
        unknown = sorted({r.pool for r in routes.values() if r.pool and r.pool not in self._handles})
        if unknown:
            raise ConfigError(f"Gateway user_config: routes: pools this application does not have: {unknown}")
        gemini = live.gemini
        if gemini != self._gemini_cfg:
            await self._set_hosted(gemini)
        self._routes = routes or {p: RouteConfig(pool=p) for p in self._handles}
        self._monitor.configure(self._routes)
        logger.info("gateway routes: %s", {a: (r.policy, r.pool, r.gemini_model) for a, r in self._routes.items()})

    async def _set_hosted(self, cfg: GeminiConfig | None) -> None:
        old = self._dispatch.hosted
        self._gemini_cfg = cfg
        if cfg is None:
            self._dispatch.hosted = None
        else:
            from serve_app.gemini import GeminiBackend

            self._dispatch.hosted = GeminiBackend(cfg)
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()  # type: ignore[attr-defined]

    def _call_pool(self, pool: str, kind: str, body: dict[str, Any], alias: str, request_id: str) -> Any:
        handle = self._handles[pool].options(stream=True, method_name="chat" if kind == "chat" else "completion")
        return handle.remote(body, alias, request_id)

    async def _refresh(self) -> None:
        try:
            if self._board is not None:
                self._monitor.update(await self._board.snapshot.remote())
            self._export_pool_gauges()
        except Exception:
            logger.warning("pool load refresh failed", exc_info=True)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.load_refresh_s)
            await self._refresh()

    def _export_pool_gauges(self) -> None:
        for name, d in self._monitor.describe().items():
            self._metrics.set("pool_replicas", d["replicas"], pool=name)
            self._metrics.set("pool_waiting", d["waiting"], pool=name)
            self._metrics.set("pool_running", d["running"], pool=name)
            self._metrics.set("pool_kv_cache_usage", d["kv_cache_usage"], pool=name)
            self._metrics.set("pool_tokens_per_second", d["tokens_per_s"], pool=name)
            self._metrics.set("pool_saturated", 1.0 if d["saturated"] else 0.0, pool=name)
            self._metrics.set("breaker_state", {"closed": 0, "half_open": 1, "open": 2}[d["breaker"]], pool=name)

    # ------------------------------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        check_auth(request.headers.get("authorization"), self._keys)
        return models_list(self._routes, self._created)

    @api.get("/admin/pools")
    async def pools(self, request: Request) -> dict[str, Any]:
        check_auth(request.headers.get("authorization"), self._keys)
        return {"pools": self._monitor.describe()}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completion")

    async def _handle(self, request: Request, kind: str) -> Response:
        rec = RequestRecord(uuid.uuid4().hex, "unknown", kind, False)
        try:
            check_auth(request.headers.get("authorization"), self._keys)
            body = parse_request(await read_body(request, self._cfg.max_body_bytes), kind)
            route = self._routes.get(body["model"])
            if route is None:
                raise NotFound(
                    f"The model '{body['model']}' does not exist. Available: {sorted(self._routes)}",
                    param="model",
                )
            rec.alias, rec.stream = body["model"], bool(body.get("stream"))
            return await self._dispatch.run(rec, route, body)
        except APIError as err:
            rec.status, rec.outcome = err.status, outcome_for_status(err.status)
            self._dispatch.finish(rec)
            raise
