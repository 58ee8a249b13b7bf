"""The shared SSE client: decoder, chunk classification, TTFT/ITL/tokens, errors, and the httpx transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_app.ops.sse_client import ChunkInfo, SSEDecoder, StreamRecorder, classify, stream_post


def ev(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def chat(content: str | None = None, role: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "smollm2",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


# What vLLM's chat stream looks like with include_usage: role-only chunk, content, finish, usage-only, DONE.
ROLE = ev(chat(content="", role="assistant"))
USAGE = ev({"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (chat(content="", role="assistant"), ChunkInfo()),
        (chat(content="Paris"), ChunkInfo(pieces=1)),
        (chat(content="", finish="stop"), ChunkInfo(finished=True)),
        (chat(content=".", finish="length"), ChunkInfo(pieces=1, finished=True)),
        ({"choices": [], "usage": {"completion_tokens": 7}}, ChunkInfo(usage_tokens=7)),
        ({"choices": [{"index": 0, "text": " Paris", "finish_reason": None}]}, ChunkInfo(pieces=1)),
        ({"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}, ChunkInfo(pieces=1)),
        ({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0}]}}]}, ChunkInfo(pieces=1)),
        ({"error": {"message": "engine died", "code": 500}}, ChunkInfo(error="engine died")),
        ({"error": "boom"}, ChunkInfo(error="boom")),
    ],
)
def test_classify(event: dict[str, Any], expected: ChunkInfo) -> None:
    assert classify(event) == expected


def test_decoder_handles_split_reads_crlf_comments_and_multiline_data() -> None:
    d = SSEDecoder()
    assert d.feed(b'data: {"a"') == []
    assert d.feed(b": 1}\n") == []
    assert d.feed(b"\n: keep-alive comment\n\nevent: x\r\ndata: one\r\ndata: two\r\n\r\ndata: [DONE]\n\n") == [
        '{"a": 1}',
        "one\ntwo",
        "[DONE]",
    ]


def test_ttft_is_first_output_chunk_not_role_chunk_and_tokens_come_from_usage() -> None:
    rec = StreamRecorder(start=10.0, record_chunks=True)
    rec.response(200, {"x-served-by": "self-hosted"})
    rec.feed(ROLE, 10.1)  # role-only: no output yet
    rec.feed(ev(chat(content="The")), 10.3)
    rec.feed(ev(chat(content=" capital")) + ev(chat(content=" is")), 10.35)  # two events in one read
    rec.feed(ev(chat(content="", finish="stop")), 10.4)  # finish-only: not an output chunk, no ITL
    rec.feed(USAGE + DONE, 10.45)
    s = rec.finish(10.5)
    assert s.ttft_s == pytest.approx(0.3)
    assert s.itl_s == pytest.approx([0.05, 0.0])
    assert (s.pieces, s.usage_tokens, s.tokens) == (3, 3, 3)
    assert s.chunks == [(10.3, 1), (10.35, 1), (10.35, 1)]
    assert (s.ok, s.served_by, s.error, s.end) == (True, "self-hosted", None, 10.5)


def test_usage_larger_than_pieces_wins_and_itl_can_be_off() -> None:
    rec = StreamRecorder(start=0.0, record_itl=False)
    rec.response(200, {})
    rec.feed(ROLE + ev(chat(content="ab")) + ev(chat(content="cd")), 1.0)
    rec.feed(ev({"choices": [], "usage": {"completion_tokens": 4}}) + DONE, 2.0)
    s = rec.finish(2.0)
    assert (s.pieces, s.tokens, s.itl_s, s.ok) == (2, 4, [], True)


def test_empty_answer_gets_ttft_from_the_finish_chunk() -> None:
    rec = StreamRecorder(start=0.0)
    rec.response(200, {})
    rec.feed(ROLE, 0.1)
    rec.feed(ev(chat(content="", finish="length")) + DONE, 0.2)
    s = rec.finish(0.2)
    assert (s.ttft_s, s.tokens, s.ok) == (0.2, 0, True)


def test_error_event_inside_a_200_stream_is_an_error() -> None:
    rec = StreamRecorder(start=0.0)
    rec.response(200, {"x-served-by": "gemini"})
    rec.feed(ROLE + ev(chat(content="Par")), 0.2)
    rec.feed(ev({"error": {"message": "upstream reset", "type": "server_error", "code": 502}}) + DONE, 0.3)
    s = rec.finish(0.3)
    assert (s.status, s.done, s.ok, s.error) == (200, True, False, "upstream reset")
    assert s.ttft_s == 0.2


def test_stream_without_done_is_an_error_and_bad_json_too() -> None:
    rec = StreamRecorder(start=0.0)
    rec.response(200, {})
    rec.feed(ROLE + ev(chat(content="x")), 0.1)
    assert rec.finish(0.2).error == "stream ended without [DONE]"
    bad = StreamRecorder(start=0.0)
    bad.response(200, {})
    bad.feed(b"data: {not json\n\n" + DONE, 0.1)
    assert (bad.finish(0.1).error or "").startswith("not JSON")


def _app(chunks: list[bytes], status: int = 200) -> httpx.MockTransport:
    async def body() -> AsyncIterator[bytes]:
        for c in chunks:
            await asyncio.sleep(0.01)
            yield c

    def handler(request: httpx.Request) -> httpx.Response:
        assert json.loads(request.content)["stream"] is True
        if status != 200:
            return httpx.Response(status, json={"error": {"message": "busy"}})
        return httpx.Response(200, headers={"x-served-by": "self-hosted"}, content=body())

    return httpx.MockTransport(handler)


async def test_stream_post_reads_a_real_shaped_stream() -> None:
    chunks = [ROLE, ev(chat(content="Paris")), ev(chat(content=".", finish="stop")), USAGE, DONE]
    async with httpx.AsyncClient(transport=_app(chunks)) as client:
        s = await stream_post(client, "http://app/v1/chat/completions", {"stream": True})
    assert (s.ok, s.status, s.served_by, s.tokens, len(s.itl_s)) == (True, 200, "self-hosted", 3, 1)
    assert s.ttft_s is not None and 0.015 < s.ttft_s < s.itl_s[0] + s.ttft_s + 1


async def test_stream_post_http_error_is_reported_not_raised() -> None:
    async with httpx.AsyncClient(transport=_app([], status=503)) as client:
        s = await stream_post(client, "http://app/v1/chat/completions", {"stream": True})
    assert (s.ok, s.status, s.ttft_s) == (False, 503, None)
    assert s.error is not None and s.error.startswith("HTTP 503") and "busy" in s.error
