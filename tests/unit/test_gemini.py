"""GeminiBackend through the real google-genai SDK against the Gemini stand-in server (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import time

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_app import errors
from serve_app.config import GeminiConfig
from serve_app.gemini import GeminiBackend
from serve_app.protocol import ChunkReply, JSONReply
from serve_app.testing.gemini_standin import StandIn
from tests.unit.gemini_helpers import CHAT, KEY, KEY_ENV, MODEL, collect, events, make_backend

pytest_plugins = ["tests.unit.gemini_fixtures"]
pytestmark = pytest.mark.asyncio(loop_scope="module")


# ------------------------------------------------------------------------------------ happy paths
async def test_chat_non_stream_shape_usage_and_request_format(backend: GeminiBackend, stand: StandIn) -> None:
    body = {
        **CHAT,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_completion_tokens": 50,
        "stop": "never-there",
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
    }
    items = await collect(backend.chat(body, "my-alias", "req-1"))
    assert len(items) == 1 and isinstance(items[0], JSONReply)
    resp = ChatCompletion.model_validate(items[0].body)
    assert resp.id == "chatcmpl-req-1" and resp.model == "my-alias" and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Gemini stand-in reply: another one please"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    # 1 word = 1 token in the stand-in: system (3) + turns (3 + 1 + 3) + developer (3)
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (13, 6, 19)

    (req,) = stand.requests()
    assert req["path"] == f"/v1beta/models/{MODEL}:generateContent"
    assert req["key_present"] and req["key_matched"]
    assert "x-goog-api-key" not in {k.lower() for k in req["headers"]}
    sent = req["body"]
    assert sent["systemInstruction"] == {"parts": [{"text": "You are terse."}, {"text": "Answer in English."}]}
    assert [c["role"] for c in sent["contents"]] == ["user", "model", "user"]
    assert sent["contents"][2]["parts"] == [{"text": "another"}, {"text": "one please"}]
    assert sent["generationConfig"] == {
        "temperature": 0.3,
        "topP": 0.9,
        "maxOutputTokens": 50,
        "stopSequences": ["never-there"],
        "seed": 7,
        "presencePenalty": 0.5,
        "frequencyPenalty": 0.25,
        "thinkingConfig": {"thinking_budget": 0},  # GeminiConfig.thinking_budget's default (no thinking)
    }


async def test_chat_stream_chunks_role_first_usage_last(backend: GeminiBackend, stand: StandIn) -> None:
    items = await collect(backend.chat({**CHAT, "stream": True}, "my-alias", "req-2"))
    chunks = [ChatCompletionChunk.model_validate(e) for e in events(items)]
    assert all(c.id == "chatcmpl-req-2" and c.model == "my-alias" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == "Gemini stand-in reply: another one please"
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 6
    last = items[-1]
    assert (
        isinstance(last, ChunkReply)
        and last.usage_only
        and last.usage == usage_chunk.usage.model_dump(exclude_none=True)
    )
    assert sum(i.tokens for i in items if isinstance(i, ChunkReply)) == 6
    (req,) = stand.requests()
    assert req["path"] == f"/v1beta/models/{MODEL}:streamGenerateContent" and req["query"] == {"alt": "sse"}


async def test_stream_usage_chunk_is_sent_when_asked(backend: GeminiBackend) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    items = await collect(backend.chat(body, "a", "r"))
    last = items[-1]
    assert isinstance(last, ChunkReply) and last.usage is not None and not last.usage_only


async def test_completion_non_stream_and_stream(backend: GeminiBackend, stand: StandIn) -> None:
    body = {"model": MODEL, "prompt": ["tell me three things"], "max_tokens": 4}
    (item,) = await collect(backend.completion(body, "comp-alias", "c1"))
    assert isinstance(item, JSONReply)
    resp = Completion.model_validate(item.body)
    assert resp.id == "cmpl-c1" and resp.object == "text_completion" and resp.model == "comp-alias"
    assert resp.choices[0].text == "Gemini stand-in reply: tell" and resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 4 and resp.usage.prompt_tokens == 4
    assert stand.requests()[0]["body"]["contents"] == [{"role": "user", "parts": [{"text": "tell me three things"}]}]

    items = await collect(backend.completion({**body, "stream": True}, "comp-alias", "c2"))
    evs = events(items)
    assert all(e["object"] == "text_completion" and e["id"] == "cmpl-c2" for e in evs)
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == "Gemini stand-in reply: tell"
    assert evs[-2]["choices"][0]["finish_reason"] == "length"
    assert evs[-1]["choices"] == [] and evs[-1]["usage"]["completion_tokens"] == 4
    Completion.model_validate(evs[-2])  # the finishing chunk is a complete Completion


async def test_n_candidates_and_stop_sequences(backend: GeminiBackend, stand: StandIn) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "alpha beta gamma"}], "n": 2, "stop": ["gamma"]}
    (item,) = await collect(backend.chat(body, "a", "r"))
    assert isinstance(item, JSONReply)
    resp = ChatCompletion.model_validate(item.body)
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].message.content == "Gemini stand-in reply: alpha beta"
    assert resp.choices[1].message.content == "Gemini stand-in reply 2: alpha beta"
    assert all(c.finish_reason == "stop" for c in resp.choices)
    assert stand.requests()[0]["body"]["generationConfig"] == {
        "stopSequences": ["gamma"],
        "candidateCount": 2,
        "thinkingConfig": {"thinking_budget": 0},
    }


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [("SAFETY", "content_filter"), ("RECITATION", "content_filter"), ("MAX_TOKENS", "length"), ("OTHER", "stop")],
)
async def test_finish_reason_mapping_through_the_sdk(
    backend: GeminiBackend, stand: StandIn, upstream: str, expected: str
) -> None:
    stand.set(finish_reason=upstream)
    (item,) = await collect(backend.chat({**CHAT}, "a", "r"))
    assert isinstance(item, JSONReply) and item.body["choices"][0]["finish_reason"] == expected
    evs = events(await collect(backend.chat({**CHAT, "stream": True}, "a", "r")))
    assert evs[-2]["choices"][0]["finish_reason"] == expected


async def test_thinking_tokens_count_as_completion(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(thoughts_tokens=10)
    (item,) = await collect(backend.chat({**CHAT}, "a", "r"))
    assert isinstance(item, JSONReply)
    usage = item.body["usage"]
    assert usage["completion_tokens"] == 16 and usage["completion_tokens_details"] == {"reasoning_tokens": 10}
    assert usage["total_tokens"] == usage["prompt_tokens"] + 16


async def test_api_version_and_base_url_env(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("GEMINI_BASE_URL", stand.base_url)
    cfg = GeminiConfig(api_key_env=KEY_ENV, base_url="http://127.0.0.1:9", api_version="v1", timeout_s=5.0)
    b = GeminiBackend(cfg)
    try:
        await collect(b.chat({**CHAT}, "a", "r"))
    finally:
        await b.close()
    assert stand.requests()[0]["path"] == f"/v1/models/{MODEL}:generateContent"


async def test_first_upstream_call_happens_before_the_first_item(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(latency_ms=300, tokens_per_second=50)
    gen = backend.chat({**CHAT, "stream": True}, "a", "r")
    assert stand.requests() == []  # nothing is sent until the gateway pulls
    started = time.monotonic()
    first = await gen.__anext__()
    assert time.monotonic() - started >= 0.3
    assert isinstance(first, ChunkReply) and first.tokens == 1 and len(stand.requests()) == 1
    rest = [item async for item in gen]
    assert len(rest) == 6  # 5 more words, then the usage chunk


async def test_closing_the_stream_early_releases_the_upstream(backend: GeminiBackend, stand: StandIn) -> None:
    stand.set(tokens_per_second=10)
    gen = backend.chat({**CHAT, "stream": True}, "a", "r")
    assert isinstance(await gen.__anext__(), ChunkReply)
    await gen.aclose()  # what the gateway does when its client disconnects
    for _ in range(40):  # the stand-in notices at its next write (every 0.1 s)
        if stand.requests()[0].get("stream_outcome") is not None:
            break
        await asyncio.sleep(0.05)
    assert stand.requests()[0].get("stream_outcome") == "client_gone"


async def test_close_lets_running_streams_finish(stand: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    stand.set(tokens_per_second=100)
    b = make_backend(stand, monkeypatch)
    gen = b.chat({**CHAT, "stream": True}, "a", "r")
    first = await gen.__anext__()
    await b.close()  # a live config change replaced this backend
    assert not b.available
    with pytest.raises(errors.ServiceUnavailable):
        await b.chat({**CHAT}, "a", "r2").__anext__()
    rest = [item async for item in gen]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events([first, *rest])[:-1])
    assert text == "Gemini stand-in reply: another one please"
    # The stand-in records the outcome after its last write, which can land after the client read it.
    for _ in range(100):
        if stand.requests()[0].get("stream_outcome") is not None:
            break
        await asyncio.sleep(0.05)
    assert stand.requests()[0].get("stream_outcome") == "complete"
