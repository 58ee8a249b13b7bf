"""The simulated engine's capacity model and the replica-side chunk coalescing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from serve_app.config import PoolConfig
from serve_app.engines.simulated import SimulatedEngine
from serve_app.llm_server import LoadTracker, load_stats
from serve_app.protocol import ChunkReply, ErrorReply, JSONReply, Reply
from serve_app.streaming import coalesce


def _engine(**sim: object) -> SimulatedEngine:
    return SimulatedEngine("p", PoolConfig.model_validate({"engine": "simulated", "model": "m", "simulated": sim}))


async def _drain(it: AsyncIterator[Reply]) -> list[Reply]:
    return [x async for x in it]


async def test_simulated_queueing_beyond_max_num_seqs() -> None:
    eng = _engine(max_num_seqs=2, tokens_per_second=50, first_token_delay_s=0)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    tasks = [asyncio.create_task(_drain(eng.chat(dict(body), str(i)))) for i in range(5)]
    await asyncio.sleep(0.03)
    load = eng.load()
    assert (load.running, load.waiting) == (2, 3)
    results = await asyncio.gather(*tasks)
    assert all(isinstance(r[0], JSONReply) for r in results)
    assert eng.load().running == 0 and eng.load().generated_tokens_total == 25


async def test_simulated_stream_shape_and_usage_flag() -> None:
    eng = _engine(tokens_per_second=1000, first_token_delay_s=0)
    items = await _drain(
        eng.chat({"messages": [{"role": "user", "content": "a b"}], "max_tokens": 4, "stream": True}, "x")
    )
    chunks = [i for i in items if isinstance(i, ChunkReply)]
    assert sum(c.tokens for c in chunks) == 4
    assert chunks[-1].usage == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    assert chunks[-1].usage_only  # the client did not ask for usage
    first = json.loads(chunks[0].data.removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"


async def test_simulated_rejects_too_long_prompt() -> None:
    eng = _engine(max_model_len=10)
    items = await _drain(eng.chat({"messages": [{"role": "user", "content": "w " * 20}]}, "x"))
    assert isinstance(items[0], ErrorReply) and items[0].status == 400


async def _burst() -> AsyncIterator[Reply]:
    yield ChunkReply("a", tokens=1)
    yield ChunkReply("b", tokens=1)
    yield ChunkReply("c", tokens=2)
    yield ChunkReply("u", usage={"completion_tokens": 4}, usage_only=True)


async def test_coalesce_merges_waiting_chunks_but_keeps_usage_separate() -> None:
    out = await _drain(coalesce(_burst()))
    datas = [(o.data, o.tokens) for o in out if isinstance(o, ChunkReply)]
    assert "".join(d for d, _ in datas) == "abcu"
    assert sum(t for _, t in datas) == 4
    assert isinstance(out[-1], ChunkReply) and out[-1].usage_only and out[-1].data == "u"


async def test_coalesce_closing_early_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[Reply]:
        try:
            while True:
                yield ChunkReply("x", tokens=1)
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    gen = coalesce(endless())
    await gen.__anext__()
    await gen.aclose()
    await asyncio.wait_for(closed.wait(), 1)


async def test_coalesce_forwards_errors() -> None:
    async def failing() -> AsyncIterator[Reply]:
        yield ChunkReply("x", tokens=1)
        raise RuntimeError("boom")

    gen = coalesce(failing())
    seen: list[Reply] = []
    try:
        async for item in gen:
            seen.append(item)
    except RuntimeError as err:
        assert str(err) == "boom"
    else:
        raise AssertionError("error was swallowed")
    assert seen


def test_load_tracker_rate_and_demand() -> None:
    t = LoadTracker()
    assert t.observe(0.0, 0) == 0.0
    assert t.observe(1.0, 100) == 100.0
    assert t.observe(2.0, 300) == 150.0
    assert t.peak() == 150.0
    stats = load_stats(waiting=2, running=2, kv=0.5, rate=100.0, peak=t.peak())
    assert stats["demand_tokens_per_s"] == 200.0 and stats["capacity_tokens_per_s"] == 150.0


async def test_coalesce_interval_batches_a_slow_stream_but_never_holds_the_first_chunk() -> None:
    async def paced() -> AsyncIterator[Reply]:
        for _ in range(20):
            yield ChunkReply("t", tokens=1)
            await asyncio.sleep(0.01)

    started = asyncio.get_running_loop().time()
    arrivals: list[tuple[float, int]] = []
    async for item in coalesce(paced(), interval_s=0.05):
        assert isinstance(item, ChunkReply)
        arrivals.append((asyncio.get_running_loop().time() - started, item.tokens))
    assert arrivals[0] == (arrivals[0][0], 1) and arrivals[0][0] < 0.02  # first chunk at once, alone
    assert sum(t for _, t in arrivals) == 20
    assert len(arrivals) <= 8  # ~5 tokens per item instead of 20 items
    without = [i async for i in coalesce(paced())]
    assert len(without) >= 15  # no interval: a paced stream passes through chunk by chunk
