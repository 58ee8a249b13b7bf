"""The LLMServer deployment: one engine per replica, streamed to the gateway, load reported twice over.

Load goes (1) to the Serve controller through `record_autoscaling_stats()` for the autoscaling policy and
(2) to the application's LoadBoard actor for the gateway's spill decision. The engine never sees the
client-facing alias: the request's `model` is set to the engine's served name (or the route's LoRA adapter)
on the way in, and set back to the alias on the way out (a rewrite built once per request; none when equal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from serve_app import autoscaling
from serve_app.config import PoolConfig
from serve_app.engines import create_engine
from serve_app.errors import error_body
from serve_app.loadboard import get_board
from serve_app.protocol import ChunkReply, ErrorReply, JSONReply, Reply
from serve_app.streaming import coalesce

logger = logging.getLogger(__name__)

_PUBLISH_INTERVAL_S = 0.5
_DEAD_HOLD_S = 2.0  # see _guarded: longer than the exit delay in _leave_soon
_RATE_WINDOW_S = 5.0  # tokens/s is measured over this window
_PEAK_WINDOW_S = 600.0  # the capacity estimate is the peak tokens/s over this window


class LoadTracker:
    """Turns EngineLoad samples into the numbers the autoscaler and the gateway use."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()
        self._peaks: deque[tuple[float, float]] = deque()

    def observe(self, now: float, generated_total: int) -> float:
        """Record the engine's token counter; return generated tokens/s over the recent window."""
        self._samples.append((now, generated_total))
        while len(self._samples) > 2 and now - self._samples[0][0] > _RATE_WINDOW_S:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        rate = (generated_total - n0) / (now - t0) if now > t0 else 0.0
        self._peaks.append((now, rate))
        while self._peaks and now - self._peaks[0][0] > _PEAK_WINDOW_S:
            self._peaks.popleft()
        return rate

    def peak(self) -> float:
        return max((r for _, r in self._peaks), default=0.0)


def load_stats(waiting: int, running: int, kv: float, rate: float, peak: float) -> dict[str, float]:
    """The stats every replica reports (key names owned by serve_app.autoscaling)."""
    demand = rate * (running + waiting) / max(running, 1) if rate > 0 else 0.0
    return {
        autoscaling.WAITING: float(waiting),
        autoscaling.RUNNING: float(running),
        autoscaling.KV_CACHE_USAGE: float(kv),
        autoscaling.TOKENS_PER_S: rate,
        autoscaling.DEMAND_TOKENS_PER_S: demand,
        autoscaling.CAPACITY_TOKENS_PER_S: peak,
    }


Realiaser = Callable[[Reply], Reply]


def _same(reply: Reply) -> Reply:
    return reply


def realiaser(answered_as: str, alias: str) -> Realiaser:
    """The per-stream rewrite of the engine's model name (served name or adapter) to the client's alias.

    Built once per request: when the names match (the common case) it is the identity; otherwise the byte
    pattern is formatted once and each chunk costs one str.replace.
    """
    if alias == answered_as:
        return _same
    old, new = f'"model":"{answered_as}"', f'"model":"{alias}"'

    def rewrite(reply: Reply) -> Reply:
        if isinstance(reply, ChunkReply):
            reply.data = reply.data.replace(old, new)
        elif isinstance(reply, JSONReply) and reply.body.get("model") == answered_as:
            reply.body["model"] = alias
        return reply

    return rewrite


class LLMServer:
    """One engine per replica. Called by the gateway through a streaming DeploymentHandle."""

    async def __init__(self, pool_name: str, pool_config: dict[str, Any]) -> None:  # type: ignore[misc]
        self._pool_name = pool_name
        self._pool = PoolConfig.model_validate(pool_config)
        self._engine = create_engine(pool_name, self._pool)
        self._served = self._engine.served_model_name
        self._batch_s = self._pool.deployment.stream_batch_interval_ms / 1000
        started = time.monotonic()
        await self._engine.start()
        self._engine_start_s = time.monotonic() - started
        with contextlib.suppress(Exception):  # outside a Ray worker there is no metrics agent
            _engine_start_metric().observe(self._engine_start_s, tags={"pool": pool_name})
        logger.info("pool %s: engine %s ready in %.1f s", pool_name, self._pool.engine, time.monotonic() - started)
        self._tracker = LoadTracker()
        self._stats = load_stats(0, 0, 0.0, 0.0, 0.0)
        self._spill: dict[str, float] = {k: 0.0 for k in autoscaling.SPILL_STAT_KEYS}
        self._active = 0  # requests inside the engine now
        self._max_num_seqs = float(self._engine.info().get("max_num_seqs") or 0)
        self._stall_s = self._pool.deployment.engine_stall_timeout_s
        self._last_generated, self._progress_at = -1, time.monotonic()
        self._stalled = self._engine_dead = False
        try:
            ctx = serve.get_replica_context()
            self._replica_id = ctx.replica_id.unique_id
            self._actor_name = ctx.replica_id.to_full_id_str()
            self._board: Any = get_board(ctx.app_name)
        except Exception:  # outside Serve (direct use in tests): no board
            self._replica_id, self._actor_name, self._board = "local", "", None
        self._publisher = asyncio.create_task(self._publish_loop())

    # ------------------------------------------------------------------------------- request methods
    async def chat(
        self, body: dict[str, Any], alias: str, request_id: str, lora: str | None = None
    ) -> AsyncIterator[Reply]:
        """A chat request for `alias`; `lora` names an adapter of this pool (None: the base model)."""
        body["model"] = target = lora or self._served
        fix = realiaser(target, alias)
        async for item in coalesce(self._guarded(self._engine.chat, body, request_id), interval_s=self._batch_s):
            yield fix(item)

    async def completion(
        self, body: dict[str, Any], alias: str, request_id: str, lora: str | None = None
    ) -> AsyncIterator[Reply]:
        body["model"] = target = lora or self._served
        fix = realiaser(target, alias)
        async for item in coalesce(self._guarded(self._engine.completion, body, request_id), interval_s=self._batch_s):
            yield fix(item)

    async def tokenize(self, body: dict[str, Any], lora: str | None = None) -> Reply:
        """POST /tokenize as `vllm serve` answers it (JSONReply or ErrorReply)."""
        return await self._tokenization("tokenize", body, lora)

    async def detokenize(self, body: dict[str, Any], lora: str | None = None) -> Reply:
        """POST /detokenize as `vllm serve` answers it (JSONReply or ErrorReply)."""
        return await self._tokenization("detokenize", body, lora)

    async def _tokenization(self, kind: str, body: dict[str, Any], lora: str | None) -> Reply:
        method = getattr(self._engine, kind, None)
        if method is None:
            message = f"/{kind} is not available for the {self._pool.engine} engine of pool {self._pool_name}"
            return ErrorReply(400, error_body(message, "invalid_request_error", None, 400))
        body["model"] = lora or self._served
        reply: Reply = await method(body)
        return reply

    async def info(self) -> dict[str, Any]:
        """Static engine facts for the gateway's model cards: max_model_len, served name, LoRA adapters."""
        return dict(self._engine.info())

    # ------------------------------------------------------------------------------- load and health
    async def _guarded(self, call: Any, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        """Serve through the engine only while it is alive and making progress.

        A replica whose engine died (EngineCore killed) or stalled (no progress while busy) answers 503 at
        once instead of a slow 500, so the gateway retries elsewhere; check_health fails so Serve replaces
        the replica; the LoadBoard shows it unhealthy so gateways stop choosing it.
        """
        if not self._engine_dead and not self._engine.load().healthy:
            self._engine_dead = True
            self._leave_soon()
        problem = self._health_problem()
        if problem is not None:
            if self._engine_dead:
                # This process exits in a moment: holding the call until then turns it into an actor death,
                # which makes the caller's router drop this replica at once (a quick 503 would make it look
                # idle, and the retry would likely come straight back here).
                await asyncio.sleep(_DEAD_HOLD_S)
            yield ErrorReply(503, error_body(f"replica unavailable: {problem}", "service_unavailable", None, 503))
            return
        self._active += 1
        try:
            async for item in call(body, request_id):
                yield item
        finally:
            self._active -= 1

    def _leave_soon(self) -> None:
        """The engine died under a live replica: leave now instead of waiting for the health check.

        A replica with a dead engine answers instantly, so it looks idle and Ray's router would keep
        choosing it; a dead replica actor is dropped by every router at once, and Serve starts a new one.
        The short delay lets the 503s already written reach their callers.
        """
        logger.error("pool %s: the engine is dead; this replica exits so Serve replaces it", self._pool_name)

        def leave() -> None:
            logging.shutdown()
            os._exit(1)

        asyncio.get_running_loop().call_later(0.3, leave)

    def _health_problem(self) -> str | None:
        if self._engine_dead:
            return "engine is dead"
        if self._stalled:
            return f"engine made no progress for {self._stall_s:g} s"
        return None

    def _refresh(self) -> dict[str, float]:
        now = time.monotonic()
        load = self._engine.load()
        rate = self._tracker.observe(now, load.generated_tokens_total)
        busy = self._active > 0 or load.running > 0 or load.waiting > 0
        if load.generated_tokens_total != self._last_generated or not busy:
            self._last_generated, self._progress_at = load.generated_tokens_total, now
        self._stalled = busy and now - self._progress_at > self._stall_s
        if not load.healthy and not self._engine_dead:
            self._engine_dead = True
            self._leave_soon()
        stats = load_stats(load.waiting, load.running, load.kv_cache_usage, rate, self._tracker.peak())
        stats["healthy"] = 0.0 if self._health_problem() else 1.0
        stats.update(self._spill)
        stats["max_num_seqs"] = self._max_num_seqs
        self._stats = stats
        return stats

    async def _publish_loop(self) -> None:
        """Report load to the LoadBoard twice a second; learn the pool's spilled demand in the answer.

        Never dies: a failed iteration is logged and the next one runs (a dead publisher would leave the
        pool looking stale, hence saturated, forever).
        """
        while True:
            try:
                stats = self._refresh()
                if self._board is not None:
                    ref = self._board.report.remote(self._pool_name, self._replica_id, stats, self._actor_name)
                    async with asyncio.timeout(2.0):
                        demand = await ref
                    self._spill = {k: float(demand.get(k, 0.0)) for k in autoscaling.SPILL_STAT_KEYS}
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the board restarts on failure; the next report re-creates state
                logger.warning("pool %s: load report failed: %s", self._pool_name, type(err).__name__)
            await asyncio.sleep(_PUBLISH_INTERVAL_S)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        # async: runs on the replica's event loop, like the publish loop (no concurrent deque mutation)
        return self._refresh()

    async def stats(self) -> dict[str, Any]:
        """Load, engine facts and replica identity (for tests, the trace tool and operators)."""
        return {
            "replica_id": self._replica_id,
            "pool": self._pool_name,
            "pid": os.getpid(),
            "engine_pids": _engine_pids(),
            "engine_start_s": self._engine_start_s,
            "active": self._active,
            **self._refresh(),
            **self._engine.info(),
        }

    async def wake(self) -> None:
        """No-op the gateway calls while the pool is at zero replicas and its requests spill.

        The call waits at the handle until a replica exists, and Ray counts it as a queued request: that
        is what makes Serve's cold start (0 -> 1) happen without sending it a user's request.
        """

    async def set_faults(self, **faults: Any) -> str:
        """Test hook for the simulated engine (fault injection); refused by real engines. Returns the
        replica id, so a test can tell which replica it reached."""
        setter = getattr(self._engine, "set_faults", None)
        if setter is None:
            raise TypeError(f"the {self._pool.engine} engine has no fault injection")
        setter(**faults)
        return self._replica_id

    async def check_health(self) -> None:
        self._refresh()
        problem = self._health_problem()
        if problem is not None:
            raise RuntimeError(f"pool {self._pool_name}: {problem}")
        await self._engine.check_health()

    async def __del__(self) -> None:
        self._publisher.cancel()
        if self._board is not None:
            with contextlib.suppress(Exception):
                self._board.remove.remote(self._pool_name, self._replica_id)
        await self._engine.shutdown()


def _engine_pids() -> list[int]:
    """Processes the engine runs outside this one (vLLM's EngineCore), for operators and chaos tests."""
    import psutil

    try:
        return [c.pid for c in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []


def _engine_start_metric() -> Any:
    from ray.util import metrics as ray_metrics

    return ray_metrics.Histogram(
        "serve_app_engine_start_seconds",
        "Replica cold start: engine construction until it can take requests.",
        boundaries=[1, 2, 5, 10, 20, 30, 60, 120, 300, 600],
        tag_keys=("pool",),
    )
