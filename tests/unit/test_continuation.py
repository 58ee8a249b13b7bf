"""Table tests for continuing a broken stream: refusals, replaying what was sent, the continuation body."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app import continuation as cont
from serve_app.engines.simulated import continued_words
from serve_app.protocol import ChunkReply, split_inband_error, sse

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "kind", "reason"),
    [
        ({"messages": MSGS}, "chat", None),
        ({"messages": MSGS, "n": 2}, "chat", "n>1"),
        ({"messages": MSGS, "tools": [{"type": "function"}]}, "chat", "tools"),
        ({"messages": MSGS, "tools": [{"type": "function"}], "tool_choice": "none"}, "chat", None),
        ({"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {}}}, "chat", "response_format"),
        ({"messages": MSGS, "response_format": {"type": "text"}}, "chat", None),
        ({"messages": MSGS, "logprobs": True}, "chat", "logprobs"),
        ({"messages": MSGS, "guided_json": {"type": "object"}}, "chat", "guided_decoding"),
        ({"messages": MSGS, "continue_final_message": True}, "chat", "continue_final_message"),
        ({"prompt": "x"}, "completion", None),
        ({"prompt": "x", "echo": True}, "completion", "echo"),
        ({"prompt": [1, 2, 3]}, "completion", "prompt_not_text"),
        ({"prompt": "x", "logprobs": 2}, "completion", "logprobs"),
    ],
)
def test_refusal(body: dict[str, Any], kind: str, reason: str | None) -> None:
    assert cont.refusal(body, kind) == reason


def _chat_chunk(content: str | None, finish: str | None = None, ident: str = "chatcmpl-a") -> str:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return sse({"id": ident, "object": "chat.completion.chunk", "created": 100, "model": "m", "choices": [choice]})


def test_replay_rebuilds_the_partial_answer() -> None:
    role = sse({"id": "chatcmpl-a", "created": 100, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    sent = [role, _chat_chunk("The ") + _chat_chunk("quick "), ": a comment\n\n", _chat_chunk("brown ")]
    p = cont.replay(sent)
    assert (p.id, p.created, p.text, p.finished) == ("chatcmpl-a", 100, "The quick brown ", False)
    assert cont.replay([_chat_chunk("x", "stop")]).finished


def test_continuation_body_for_chat_and_completion() -> None:
    p = cont.Partial("chatcmpl-a", 100, "The quick ", False)
    body = {"model": "m", "messages": MSGS, "max_tokens": 10, "temperature": 0, "seed": 7}
    out = cont.continuation_body(body, "chat", p, produced=2)
    assert out is not None
    assert out["messages"] == [*MSGS, {"role": "assistant", "content": "The quick "}]
    assert out["continue_final_message"] and out["add_generation_prompt"] is False
    assert out["max_tokens"] == 8 and out["seed"] == 7 and out["temperature"] == 0 and out["stream"]
    assert body["messages"] == MSGS and body["max_tokens"] == 10  # the original is untouched
    comp = cont.continuation_body({"prompt": "Once", "max_tokens": 5}, "completion", p, produced=2)
    assert comp is not None and comp["prompt"] == "OnceThe quick " and comp["max_tokens"] == 3
    assert cont.continuation_body({"messages": MSGS, "max_tokens": 2}, "chat", p, produced=2) is None
    assert cont.continuation_body(body, "chat", cont.Partial("i", 1, "x", True), produced=1) is None


def test_rewriter_keeps_the_original_id_and_created() -> None:
    original = cont.Partial("chatcmpl-orig", 100, "", False)
    new = _chat_chunk("brown ", ident="chatcmpl-new").replace('"created":100', '"created":200')
    new_id, new_created = cont.first_ids(new)
    assert (new_id, new_created) == ("chatcmpl-new", 200)
    out = cont.rewriter(original, new_id, new_created)(new)
    assert '"chatcmpl-orig"' in out and "chatcmpl-new" not in out and '"created":100' in out


def test_usage_counts_the_whole_answer() -> None:
    usage = {"prompt_tokens": 15, "completion_tokens": 6, "total_tokens": 21}
    merged = cont.merged_usage(usage, produced_before=4)
    assert merged == {"prompt_tokens": 11, "completion_tokens": 10, "total_tokens": 21}
    data = sse({"id": "x", "choices": [], "usage": usage})
    assert '"completion_tokens":10' in cont.with_usage(data, merged)


def test_split_inband_error() -> None:
    ok = ChunkReply(_chat_chunk("a"), tokens=1)
    assert split_inband_error(ok) == (ok, None)
    err = sse({"error": {"message": "EngineCore died", "code": 500}})
    before, event = split_inband_error(ChunkReply(_chat_chunk("a") + err, tokens=1))
    assert before is not None and before.tokens == 1 and "error" not in before.data
    assert event is not None and event.status == 500 and event.body["error"]["message"] == "EngineCore died"
    only, event2 = split_inband_error(ChunkReply(err))
    assert only is None and event2 is not None
    # Generated text that talks about errors is escaped inside JSON and never mistaken for an event.
    text = ChunkReply(_chat_chunk('{"error": 1}'), tokens=1)
    assert split_inband_error(text) == (text, None)


@pytest.mark.parametrize(
    ("body", "kind", "words"),
    [
        ({"messages": MSGS}, "chat", 0),
        (
            {"messages": [*MSGS, {"role": "assistant", "content": "The quick "}], "continue_final_message": True},
            "chat",
            2,
        ),
        ({"messages": [*MSGS, {"role": "assistant", "content": "The quick "}]}, "chat", 0),
        ({"prompt": "hello The quick brown "}, "completion", 3),
        ({"prompt": "hello"}, "completion", 0),
    ],
)
def test_simulated_engine_continues_where_it_broke(body: dict[str, Any], kind: str, words: int) -> None:
    assert continued_words(body, kind) == words
