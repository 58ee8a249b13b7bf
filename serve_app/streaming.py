"""Merging stream chunks across a hop: fewer, larger items when chunks come faster than they are taken.

Used in the LLMServer replica (engine → handle), so one Ray hop to the gateway carries every chunk that
piled up. (A second merge in the gateway measured no difference and was removed.) Pure asyncio; no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import cast

from serve_app.protocol import ChunkReply, Reply

_END = object()


def _merge(chunks: list[ChunkReply]) -> ChunkReply:
    merged = ChunkReply("".join(c.data for c in chunks), tokens=sum(c.tokens for c in chunks))
    last = chunks[-1]
    merged.usage, merged.usage_only = last.usage, last.usage_only
    return merged


async def coalesce(replies: AsyncIterator[Reply], max_batch: int = 64, interval_s: float = 0.0) -> AsyncIterator[Reply]:
    """Yield replies in order, merging consecutive stream chunks that are already waiting into one item.

    With `interval_s` > 0, a batch after the first one also waits up to that long for more chunks: a
    bounded amount of added latency in exchange for fewer hops (the first chunk is never held back, so
    time to first token is unchanged). A usage-only chunk is never merged into content, so the gateway
    can drop it cleanly. Closing this iterator closes the source now (an engine-side abort), not at GC.
    """
    queue: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in replies:
                await queue.put(item)
            await queue.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # forwarded to the consumer, re-raised there
            await queue.put(err)

    task = asyncio.create_task(pump())
    first = True
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, ChunkReply) or item.usage_only:
                yield cast(Reply, item)
                continue
            batch = [item]
            deadline = time.monotonic() + (0.0 if first else interval_s)
            first = False
            tail: object = None
            while len(batch) < max_batch:
                if queue.empty():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                else:
                    nxt = queue.get_nowait()
                if isinstance(nxt, ChunkReply) and not nxt.usage_only:
                    batch.append(nxt)
                else:
                    tail = nxt
                    break
            yield batch[0] if len(batch) == 1 else _merge(batch)
            if tail is _END:
                return
            if isinstance(tail, BaseException):
                raise tail
            if tail is not None:
                yield cast(Reply, tail)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        aclose = getattr(replies, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
