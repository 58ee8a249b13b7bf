"""Continuing a partial answer on Gemini (mid-stream failover) and the thinking budget, through the SDK."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app import errors
from serve_app.gemini import GeminiBackend
from serve_app.gemini_translate import build_request
from serve_app.protocol import JSONReply
from serve_app.testing.gemini_standin import StandIn
from tests.unit.gemini_helpers import MODEL, collect, events, make_backend

pytest_plugins = ["tests.unit.gemini_fixtures"]
pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = [{"role": "user", "content": "tell me about the sea"}]
FULL = "Gemini stand-in reply: tell me about the sea"


def _stream_text(items: list[Any]) -> str:
    out = []
    for e in events(items):
        for c in e["choices"]:
            out.append(c["delta"].get("content") or "" if "delta" in c else c.get("text") or "")
    return "".join(out)


# ------------------------------------------------------------------------------------ continuation
@pytest.mark.parametrize("partial", ["Gemini stand-in", "Gemini stand-in reply: te", "Gemini"])
async def test_chat_stream_continues_with_only_the_new_text(
    backend: GeminiBackend, stand: StandIn, partial: str
) -> None:
    body = {"model": MODEL, "stream": True, "messages": [*QUESTION, {"role": "assistant", "content": partial}]}
    items = await collect(backend.chat(body, "alias", "rid", continue_final_message=True))
    assert partial + _stream_text(items) == FULL  # no duplicated and no missing text
    first = events(items)[0]["choices"][0]["delta"]
    assert "role" not in first  # the client's stream already had its role
    assert events(items)[-2]["choices"][0]["finish_reason"] == "stop"
    sent = stand.requests()[0]["body"]["contents"]
    assert [c["role"] for c in sent] == ["user", "model"]  # a trailing model turn, no new user turn
    assert sent[-1]["parts"] == [{"text": partial}]


async def test_chat_non_stream_continuation(backend: GeminiBackend, stand: StandIn) -> None:
    body = {"model": MODEL, "messages": [*QUESTION, {"role": "assistant", "content": "Gemini stand-in"}]}
    (reply,) = await collect(backend.chat(body, "alias", "rid", continue_final_message=True))
    assert isinstance(reply, JSONReply)
    assert "Gemini stand-in" + reply.body["choices"][0]["message"]["content"] == FULL


async def test_completion_continuation_takes_prompt_and_partial(backend: GeminiBackend, stand: StandIn) -> None:
    body = {"model": MODEL, "stream": True, "prompt": ["tell me about the sea", "Gemini stand-in reply:"]}
    items = await collect(backend.completion(body, "alias", "rid", continue_final_message=True))
    assert "Gemini stand-in reply:" + _stream_text(items) == FULL
    sent = stand.requests()[0]["body"]["contents"]
    assert [(c["role"], c["parts"][0]["text"]) for c in sent] == [
        ("user", "tell me about the sea"),
        ("model", "Gemini stand-in reply:"),
    ]


async def test_model_rejecting_a_trailing_model_turn_fails_the_continuation(
    backend: GeminiBackend, stand: StandIn
) -> None:
    stand.set(model_behaviours={MODEL: "reject_continuation"})
    body = {"model": MODEL, "stream": True, "messages": [*QUESTION, {"role": "assistant", "content": "Gem"}]}
    with pytest.raises(errors.APIError, match="prefill"):
        await backend.chat(body, "alias", "rid", continue_final_message=True).__anext__()


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("chat", {"model": MODEL, "messages": QUESTION}),  # nothing to continue
        ("chat", {"model": MODEL, "messages": [*QUESTION, {"role": "assistant", "content": ""}]}),
        ("completion", {"model": MODEL, "prompt": "tell me"}),
        ("completion", {"model": MODEL, "prompt": ["tell me", ""]}),
    ],
)
async def test_continuation_needs_a_partial_answer(kind: Any, body: dict[str, Any]) -> None:
    with pytest.raises(errors.BadRequest):
        build_request(body, kind, continue_final_message=True)


# ------------------------------------------------------------------------------------ thinking
LONG_QUESTION = [{"role": "user", "content": "describe the sea in a few plain words please"}]


async def _answer(b: GeminiBackend, **kwargs: Any) -> tuple[str, str, dict[str, Any]]:
    body = {"model": "gemini-thinker", "max_tokens": 32, "messages": LONG_QUESTION}
    (reply,) = await collect(b.chat(body, "alias", "rid", **kwargs))
    assert isinstance(reply, JSONReply)
    choice = reply.body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], reply.body["usage"]


async def test_thinking_model_answers_nothing_without_a_budget(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    stand.set(model_behaviours={"gemini-thinker": "thinking"}, thinking_tokens=48)
    b = make_backend(stand, monkeypatch, thinking_budget=None)  # what the adapter did before the setting
    try:
        text, finish, use = await _answer(b)
    finally:
        await b.close()
    assert (text, finish) == ("", "length")  # 32 max_tokens all spent on thoughts
    assert use["completion_tokens_details"] == {"reasoning_tokens": 32}
    assert "thinkingConfig" not in stand.requests()[0]["body"]["generationConfig"]


async def test_default_thinking_budget_gives_a_real_answer(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(model_behaviours={"gemini-thinker": "thinking"}, thinking_tokens=48)
    text, finish, use = await _answer(backend)
    assert (text, finish) == ("Gemini stand-in reply: describe the sea in a few plain words please", "stop")
    assert "completion_tokens_details" not in use
    assert stand.requests()[0]["body"]["generationConfig"]["thinkingConfig"] == {"thinking_budget": 0}


async def test_route_budget_overrides_the_default(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(model_behaviours={"gemini-thinker": "thinking"}, thinking_tokens=48)
    text, finish, _ = await _answer(backend, thinking_budget=-1)  # the model's dynamic thinking
    assert (text, finish) == ("", "length")
    text, finish, _ = await _answer(backend, thinking_budget=24)  # 24 of 32 on thoughts, 8 for the answer
    assert finish == "length" and len(text.split()) == 8
    sent = [r["body"]["generationConfig"]["thinkingConfig"] for r in stand.requests()]
    assert sent == [{"thinking_budget": -1}, {"thinking_budget": 24}]
