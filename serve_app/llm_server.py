"""The LLMServer deployment: one engine per replica, streamed to the gateway, load reported twice over.

Load goes (1) to the Serve controller through `record_autoscaling_stats()` for the autoscaling policy and
(2) to the application's LoadBoard actor for the gateway's spill decision. The engine never sees the
client-facing alias: the request's `model` is set to the engine's served name on the way in, and set back
to the alias on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app import autoscaling
from serve_app.config import PoolConfig
from serve_app.engines import create_engine
from serve_app.loadboard import get_board
from serve_app.protocol import ChunkReply, JSONReply, Reply

logger = logging.getLogger(__name__)

_PUBLISH_INTERVAL_S = 0.5
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


def _realias(reply: Reply, served: str, alias: str) -> Reply:
    if alias == served:
        return reply
    if isinstance(reply, JSONReply):
        if reply.body.get("model") == served:
            reply.body["model"] = alias
    elif isinstance(reply, ChunkReply):
        reply.data = reply.data.replace(f'"model":"{served}"', f'"model":"{alias}"')
    return reply


def _merge(chunks: list[ChunkReply]) -> ChunkReply:
    merged = ChunkReply("".join(c.data for c in chunks), tokens=sum(c.tokens for c in chunks))
    last = chunks[-1]
    merged.usage, merged.usage_only = last.usage, last.usage_only
    return merged


async def coalesce(replies: AsyncIterator[Reply], max_batch: int = 64) -> AsyncIterator[Reply]:
    """Yield replies as they come, merging stream chunks that are already waiting into one item.

    Each item crosses a Ray hop to the gateway; when the engine produces chunks faster than the hop
    drains them, merging bounds the per-request hop count without adding latency (nothing waits).
    A usage-only chunk is never merged into content, so the gateway can drop it cleanly.
    """
    queue: asyncio.Queue[Reply | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in replies:
                await queue.put(item)
            await queue.put(None)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # forwarded to the consumer, re-raised there
            await queue.put(err)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, ChunkReply) or item.usage_only:
                yield item
                continue
            batch = [item]
            tail: Reply | BaseException | None = None
            has_tail = False
            while len(batch) < max_batch and not queue.empty():
                nxt = queue.get_nowait()
                if isinstance(nxt, ChunkReply) and not nxt.usage_only:
                    batch.append(nxt)
                else:
                    tail, has_tail = nxt, True
                    break
            yield batch[0] if len(batch) == 1 else _merge(batch)
            if has_tail:
                if tail is None:
                    return
                if isinstance(tail, BaseException):
                    raise tail
                yield tail
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        # Close the engine generator here so an engine-side abort happens now, not at GC.
        aclose = getattr(replies, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class LLMServer:
    """One engine per replica. Called by the gateway through a streaming DeploymentHandle."""

    async def __init__(self, pool_name: str, pool_config: dict[str, Any]) -> None:  # type: ignore[misc]
        self._pool_name = pool_name
        self._pool = PoolConfig.model_validate(pool_config)
        self._engine = create_engine(pool_name, self._pool)
        self._served = self._engine.served_model_name
        started = time.monotonic()
        await self._engine.start()
        logger.info("pool %s: engine %s ready in %.1f s", pool_name, self._pool.engine, time.monotonic() - started)
        self._tracker = LoadTracker()
        self._stats = load_stats(0, 0, 0.0, 0.0, 0.0)
        try:
            ctx = serve.get_replica_context()
            self._replica_id = ctx.replica_id.unique_id
            self._board: Any = get_board(ctx.app_name)
        except Exception:  # outside Serve (direct use in tests): no board
            self._replica_id, self._board = "local", None
        self._publisher = asyncio.create_task(self._publish_loop())

    # ------------------------------------------------------------------------------- request methods
    async def chat(self, body: dict[str, Any], alias: str, request_id: str) -> AsyncIterator[Reply]:
        body["model"] = self._served
        async for item in coalesce(self._engine.chat(body, request_id)):
            yield _realias(item, self._served, alias)

    async def completion(self, body: dict[str, Any], alias: str, request_id: str) -> AsyncIterator[Reply]:
        body["model"] = self._served
        async for item in coalesce(self._engine.completion(body, request_id)):
            yield _realias(item, self._served, alias)

    # ------------------------------------------------------------------------------- load and health
    def _refresh(self) -> dict[str, float]:
        load = self._engine.load()
        rate = self._tracker.observe(time.monotonic(), load.generated_tokens_total)
        self._stats = load_stats(load.waiting, load.running, load.kv_cache_usage, rate, self._tracker.peak())
        return self._stats

    async def _publish_loop(self) -> None:
        while True:
            stats = self._refresh()
            if self._board is not None:
                try:
                    self._board.report.remote(self._pool_name, self._replica_id, stats)
                except Exception:  # the board restarts on failure; the next report re-creates state
                    logger.warning("pool %s: load report failed", self._pool_name, exc_info=True)
            await asyncio.sleep(_PUBLISH_INTERVAL_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        return self._refresh()

    async def stats(self) -> dict[str, Any]:
        """Load, engine facts and replica identity (for tests, the trace tool and operators)."""
        return {
            "replica_id": self._replica_id,
            "pool": self._pool_name,
            **self._refresh(),
            **self._engine.info(),
        }

    async def set_faults(self, **faults: Any) -> None:
        """Test hook for the simulated engine (fault injection); refused by real engines."""
        setter = getattr(self._engine, "set_faults", None)
        if setter is None:
            raise TypeError(f"the {self._pool.engine} engine has no fault injection")
        setter(**faults)

    async def check_health(self) -> None:
        await self._engine.check_health()

    async def __del__(self) -> None:
        self._publisher.cancel()
        if self._board is not None:
            with contextlib.suppress(Exception):
                self._board.remove.remote(self._pool_name, self._replica_id)
        await self._engine.shutdown()
