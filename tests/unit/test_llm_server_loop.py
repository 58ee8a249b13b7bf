"""The LLMServer's load publisher never dies, and load is read on the replica's event loop only."""

from __future__ import annotations

import asyncio
import inspect

from serve_app.llm_server import LLMServer


async def test_publish_loop_survives_a_failing_iteration() -> None:
    server = LLMServer.__new__(LLMServer)
    pool = {"engine": "simulated", "model": "m", "simulated": {"max_num_seqs": 2}}
    await server.__init__("p", pool)  # type: ignore[misc]  # outside Serve: no board, same loop
    calls = 0
    real_refresh = server._refresh

    def flaky() -> dict[str, float]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("deque mutated during iteration")  # what the thread race produced
        return real_refresh()

    server._refresh = flaky  # type: ignore[method-assign]
    try:
        await asyncio.sleep(1.3)  # the loop runs every 0.5 s
        assert calls >= 2 and not server._publisher.done()
    finally:
        server._publisher.cancel()


def test_autoscaling_stats_run_on_the_event_loop() -> None:
    # A sync method would run in Serve's thread pool, racing the publish loop over the same deques.
    assert inspect.iscoroutinefunction(LLMServer.record_autoscaling_stats)
