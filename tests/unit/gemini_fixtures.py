"""Fixtures of the Gemini adapter tests: a stand-in per test module and a backend on it.

Test modules load them with `pytest_plugins = ["tests.unit.gemini_fixtures"]` (and must not import this
module themselves) and mark themselves `pytest.mark.asyncio(loop_scope="module")`: the shared backend's
aiohttp session belongs to one event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from serve_app.gemini import GeminiBackend
from serve_app.testing.gemini_standin import StandIn, running_standin
from tests.unit.gemini_helpers import KEY, make_backend


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with running_standin(api_key=KEY) as s:
        yield s


@pytest.fixture
def stand(standin: StandIn) -> StandIn:
    """The module's stand-in with default controls and an empty request log."""
    standin.set(
        latency_ms=0,
        tokens_per_second=0,
        failure="none",
        fail_after_events=1,
        retry_delay_s=None,
        finish_reason=None,
        thoughts_tokens=0,
        known_models=None,
        model_behaviours={},
        thinking_tokens=48,
    )
    standin.clear_requests()
    return standin


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_backend(standin: StandIn) -> AsyncIterator[GeminiBackend]:
    # One client for the module: building one costs a few hundred ms (TLS context), and the SDK keeps
    # one aiohttp session per event loop, so the module's tests share a loop too.
    with pytest.MonkeyPatch.context() as mp:
        b = make_backend(standin, mp)
    yield b
    await b.close()


@pytest.fixture
def backend(shared_backend: GeminiBackend, stand: StandIn) -> GeminiBackend:
    return shared_backend
