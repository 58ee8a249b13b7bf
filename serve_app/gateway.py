"""The Gateway deployment: the FastAPI ingress. Auth, body checks, the route table, then the Dispatcher.

Routes and Gemini settings arrive through `reconfigure(user_config)`, so `serve deploy` of a changed
route table reconfigures the gateway live without touching the engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from serve_app import ray_env
from serve_app.config import GatewayConfig, GeminiConfig, LiveConfig, RouteConfig, parse_live_config
from serve_app.dispatch import Dispatcher
from serve_app.errors import (
    APIError,
    NotFound,
    ServiceUnavailable,
    error_body,
)
from serve_app.lifecycle import Ledger, RequestRecord, configure_request_log
from serve_app.loadboard import get_board
from serve_app.metrics import Metrics
from serve_app.pools import PoolMonitor, Snapshot
from serve_app.protocol import JSONReply
from serve_app.relay import headers_for
from serve_app.requests import (
    SafeJSONResponse,
    check_auth,
    error_response,
    id_header,
    load_api_keys,
    load_json,
    parse_request,
    read_body,
    request_id_from,
)
from serve_app.surface import find_card, model_cards, tokenizer_target

logger = logging.getLogger(__name__)

api = FastAPI(title="serve_app", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, err: APIError) -> Response:
    return error_response(err)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> Response:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    body = error_body(str(err.detail), kind, None, err.status_code)
    return SafeJSONResponse(body, status_code=err.status_code)


@api.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> Response:
    logger.exception("unexpected error: %s", type(err).__name__)
    return SafeJSONResponse(error_body("internal error", "server_error", None, 500), status_code=500)


def models_list(
    routes: dict[str, RouteConfig],
    created: int,
    pool_info: dict[str, dict[str, Any]] | None = None,
    served_names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The /v1/models body: one card per alias (adapters with their parent, max_model_len when known)."""
    return {"object": "list", "data": model_cards(routes, created, pool_info, served_names)}


# ------------------------------------------------------------------------------------ the deployment
# Everything the class uses must be defined above it: @serve.ingress copies the class by value when the
# class statement runs, so a module-level name defined below it does not exist inside the replica.
@serve.deployment
@serve.ingress(api)
class Gateway:
    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, pools: dict[str, Any], served_names: dict[str, str], gateway: dict[str, Any]
    ) -> None:
        configure_request_log()
        self._cfg = GatewayConfig.model_validate(gateway)
        self._handles = pools
        grpc = ray_env.serve_uses_grpc()
        self._transport = "grpc" if grpc else "actor calls"
        self._stream_handles = {
            (pool, kind): handle.options(stream=True, method_name=kind, _by_reference=not grpc)
            for pool, handle in pools.items()
            for kind in ("chat", "completion")
        }
        self._keys = load_api_keys(self._cfg.api_keys_env)
        if self._keys is None:
            logger.warning(
                "API key auth is OFF (gateway.api_keys_env not set): anyone who reaches this port can call it"
            )
        self._metrics = Metrics()
        self._ledger = Ledger(self._metrics)
        self._monitor = PoolMonitor()
        self._dispatch = Dispatcher(self._monitor, self._ledger, self._call_pool, self._cfg)
        self._dispatch.served_names = dict(served_names)
        self._dispatch.wake = self._wake
        self._waking: dict[str, asyncio.Task[None]] = {}
        self._routes: dict[str, RouteConfig] = {p: RouteConfig(pool=p) for p in pools}
        self._monitor.configure(self._routes)
        self._gemini_cfg: GeminiConfig | None = None
        self._hosted_status: dict[str, dict[str, Any]] = {}
        self._config_error: str | None = None
        self._created = int(time.time())
        self._pool_info: dict[str, dict[str, Any]] = {}  # engine facts per pool, asked once
        self._snapshot: Snapshot = {}
        self._tasks: set[asyncio.Task[None]] = set()
        try:
            ctx = serve.get_replica_context()
            self._gateway_id = ctx.replica_id.unique_id
            self._board: Any = get_board(ctx.app_name)
        except Exception:
            self._gateway_id, self._board = "local", None
        await self._refresh()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the live part of the config: the route table and the Gemini settings.

        A config that does not validate is rejected and the previous table keeps serving: a typo in a
        live edit must never take the healthy gateway down (Serve would stop a replica whose
        reconfigure raises). The rejection is logged and exported (serve_app_config_rejected_total).
        """
        try:
            live = self._validate_live(user_config)
        except Exception as err:
            self._config_error = str(err)
            self._metrics.inc("config_rejected")
            logger.error("rejected the new gateway config, still serving the previous one: %s", err)
            return
        self._config_error = None
        if live.gemini != self._gemini_cfg:
            await self._set_hosted(live.gemini)
        self._routes = dict(live.routes) or {p: RouteConfig(pool=p) for p in self._handles}
        self._monitor.configure(self._routes)
        logger.info("gateway routes: %s", {a: (r.policy, r.pool, r.gemini_model) for a, r in self._routes.items()})

    def _validate_live(self, user_config: dict[str, Any]) -> LiveConfig:
        live = parse_live_config(user_config)
        unknown = sorted({r.pool for r in live.routes.values() if r.pool and r.pool not in self._handles})
        if unknown:
            raise ValueError(f"Gateway user_config: routes: pools this application does not have: {unknown}")
        return live

    async def _set_hosted(self, cfg: GeminiConfig | None) -> None:
        old = self._dispatch.hosted
        self._gemini_cfg = cfg
        if cfg is None:
            self._dispatch.hosted = None
        else:
            from serve_app.gemini import GeminiBackend

            self._dispatch.hosted = GeminiBackend(cfg)
            self._spawn(self._probe_gemini())
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()  # type: ignore[attr-defined]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe_gemini(self) -> None:
        """Probe each configured Gemini model once (a 1-token call, then a continuation check).

        Runs in the background: never blocks serving. A failing model is logged, exported and shown in
        /admin/pools; routes keep it configured (the next config change probes again).
        """
        hosted = self._dispatch.hosted
        if hosted is None or not hosted.available:
            return
        models = sorted({r.gemini_model for r in self._routes.values() if r.gemini_model})
        for model in models:
            try:
                probe = await hosted.probe(model)  # type: ignore[attr-defined]
                status = dataclasses.asdict(probe)
                if probe.ok:
                    continuable = bool(await hosted.probe_continuation(model))  # type: ignore[attr-defined]
                    status["continuable"] = continuable
                    self._dispatch.continuable[model] = continuable
            except Exception as err:  # a probe must never take the gateway down
                status = {"model": model, "ok": False, "message": f"probe failed: {type(err).__name__}"}
            self._hosted_status[model] = status
            self._metrics.set("gemini_model_up", 1.0 if status.get("ok") else 0.0, model=model)
            log = logger.info if status.get("ok") else logger.error
            log("gemini model %s probe: %s", model, status)

    def _call_pool(
        self, pool: str, kind: str, body: dict[str, Any], alias: str, request_id: str, lora: str | None
    ) -> Any:
        handle = self._stream_handles[(pool, "chat" if kind == "chat" else "completion")]
        return handle.remote(body, alias, request_id, lora) if lora else handle.remote(body, alias, request_id)

    def _wake(self, pool: str) -> None:
        """Keep one no-op call pending at the pool's handle while it has no ready replica.

        With zero replicas that call waits in the handle's queue, which Serve counts as demand and answers
        with a cold start; spilled requests never have to wait for it. Never cancelled (cancelling would
        take the demand back); a new one is sent only after the previous one returned.
        """
        if pool in self._waking:
            return

        async def call() -> None:
            try:
                await self._handles[pool].wake.remote()
            except Exception as err:
                logger.warning("wake of pool %s failed: %s", pool, type(err).__name__)
            finally:
                self._waking.pop(pool, None)

        self._waking[pool] = asyncio.ensure_future(call())
        logger.info("pool %s has no ready replica: asked Serve for one", pool)

    # ------------------------------------------------------------------------------------ pool load
    async def _refresh(self) -> None:
        """Read the LoadBoard (bounded by load_timeout_s) and publish this gateway's spilled demand.

        When the board is slow, hung or gone the last snapshot is re-applied with its age growing, so the
        pool goes stale and fails closed (spill) instead of trusting an old view forever.
        """
        if self._board is not None:
            try:
                async with asyncio.timeout(self._cfg.load_timeout_s):
                    self._snapshot = await self._board.snapshot.remote()
                self._board.report_demand.remote(self._gateway_id, self._monitor.spill_demand())
            except Exception as err:
                logger.warning("pool load refresh failed (%s); the last view ages", type(err).__name__)
        try:
            self._monitor.update(self._snapshot)
            self._export_pool_gauges()
        except Exception:
            logger.exception("pool view update failed")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.load_refresh_s)
            await self._refresh()

    def _export_pool_gauges(self) -> None:
        for name, d in self._monitor.describe().items():
            self._metrics.set("pool_replicas", d["replicas"], pool=name)
            self._metrics.set("pool_ready_replicas", d["ready_replicas"], pool=name)
            self._metrics.set("pool_waiting", d["waiting"], pool=name)
            self._metrics.set("pool_running", d["running"], pool=name)
            self._metrics.set("pool_kv_cache_usage", d["kv_cache_usage"], pool=name)
            self._metrics.set("pool_tokens_per_second", d["tokens_per_s"], pool=name)
            self._metrics.set("pool_saturated", 1.0 if d["saturated"] else 0.0, pool=name)
            self._metrics.set("breaker_state", {"closed": 0, "half_open": 1, "open": 2}[d["breaker"]], pool=name)
        # Gauges set only on events are re-set here too: a series nobody records for a while is dropped by
        # Ray's exporter, and an idle in-flight count of 0 is a value, not a gap.
        self._ledger.export_inflight()
        for model, status in self._hosted_status.items():
            self._metrics.set("gemini_model_up", 1.0 if status.get("ok") else 0.0, model=model)

    # ------------------------------------------------------------------------------------ routes
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "ok"}

    @api.get("/health/ready")
    async def ready(self) -> Response:
        """Readiness: 503 until every self_hosted_only route's pool has a ready replica."""
        missing = sorted(
            {r.pool for r in self._routes.values() if r.policy == "self_hosted_only" and r.pool}
            - {p for p in self._monitor.pools if self._monitor.ready_replicas(p) > 0}
        )
        if missing:
            err = ServiceUnavailable(f"no ready replica yet for pools {missing}")
            return error_response(err, retry_after_s=self._cfg.retry_after_s)
        return SafeJSONResponse({"status": "ready"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        check_auth(request.headers.get("authorization"), self._keys)
        return models_list(self._routes, self._created, await self._engine_facts(), self._dispatch.served_names)

    # ---------------------------------------------------------- model cards, /tokenize, /detokenize
    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request.headers.get("authorization"), self._keys)
        cards = model_cards(self._routes, self._created, await self._engine_facts(), self._dispatch.served_names)
        return find_card(cards, model_id, sorted(self._routes))

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        return await self._tokenizer(request, "tokenize")

    @api.post("/detokenize")
    async def detokenize(self, request: Request) -> Response:
        return await self._tokenizer(request, "detokenize")

    async def _tokenizer(self, request: Request, kind: str) -> Response:
        """vLLM's /tokenize and /detokenize, answered by a replica of the pool the alias routes to."""
        check_auth(request.headers.get("authorization"), self._keys)
        body = load_json(await read_body(request, self._cfg.max_body_bytes))
        pool, lora = tokenizer_target(self._routes, body, sorted(self._handles))
        handle = self._handles[pool].options(method_name=kind)
        try:
            reply = await (handle.remote(body, lora) if lora else handle.remote(body))
        except Exception as err:  # no replica / replica failed: retryable, never a 500
            logger.warning("/%s on pool %s failed: %s", kind, pool, type(err).__name__)
            raise ServiceUnavailable(f"pool {pool} cannot answer /{kind} right now") from None
        if isinstance(reply, JSONReply):
            return SafeJSONResponse(reply.body)
        return SafeJSONResponse(reply.body, status_code=reply.status)

    async def _engine_facts(self) -> dict[str, dict[str, Any]]:
        """Each routed pool's engine facts (max_model_len, LoRA adapters), asked once per pool and cached.

        A pool whose replica is not up yet is skipped (asked again next time): cards then lack max_model_len.
        """
        wanted = {r.pool for r in self._routes.values() if r.pool and r.pool in self._handles} - set(self._pool_info)
        for pool in sorted(wanted):
            try:
                async with asyncio.timeout(2.0):
                    self._pool_info[pool] = await self._handles[pool].options(method_name="info").remote()
            except Exception as err:
                logger.info("engine facts of pool %s not available yet (%s)", pool, type(err).__name__)
        return self._pool_info

    @api.get("/admin/pools")
    async def pools(self, request: Request) -> dict[str, Any]:
        check_auth(request.headers.get("authorization"), self._keys)
        return {
            "pools": self._monitor.describe(),
            "gemini_models": self._hosted_status,
            "config_error": self._config_error,
            "open_requests": self._ledger.open,
            "inflight": self._ledger.inflight(),
            "transport": self._transport,
        }

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "chat")

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completion")

    async def _handle(self, request: Request, kind: str) -> Response:
        """One lifecycle: every way out finishes the request exactly once (see serve_app.lifecycle)."""
        given = request.headers.get("x-request-id")
        rec = self._ledger.start(RequestRecord(request_id_from(given), "unknown", kind, False))
        rec.id_header = given is None  # Ray's proxy echoes the id it put in the request header
        handed_over = False
        try:
            check_auth(request.headers.get("authorization"), self._keys)
            body = parse_request(await read_body(request, self._cfg.max_body_bytes), kind)
            route = self._routes.get(body["model"])
            if route is None:
                raise NotFound(
                    f"The model {body['model']!r} does not exist. Available: {sorted(self._routes)}",
                    param="model",
                )
            rec.alias, rec.stream = body["model"], bool(body.get("stream"))
            response = await self._dispatch.run(rec, route, body)
            handed_over = True  # the response (or its close hook) finishes the request
            return response
        except APIError as err:
            rec.fail(err.status)
            return error_response(
                err, headers_for(rec) if rec.route != "none" else id_header(rec), self._cfg.retry_after_s
            )
        except (asyncio.CancelledError, GeneratorExit):
            rec.fail(499)
            raise
        except Exception:
            logger.exception("request %s failed unexpectedly", rec.request_id)
            rec.fail(500)
            return SafeJSONResponse(
                error_body("internal error", "server_error", None, 500), status_code=500, headers=id_header(rec)
            )
        finally:
            if not handed_over:
                self._ledger.finish(rec)
