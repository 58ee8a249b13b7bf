"""Pure translation tables: OpenAI → Gemini requests, Gemini → OpenAI responses, Gemini errors → APIError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_app import errors
from serve_app.gemini import map_upstream_error
from serve_app.gemini_render import StreamRenderer, finish_reason, render, usage
from serve_app.gemini_translate import build_request, check_supported

USER = [{"role": "user", "content": "hi"}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gemini-x", "messages": USER, **extra}


def comp(**extra: Any) -> dict[str, Any]:
    return {"model": "gemini-x", "prompt": "hi", **extra}


# ------------------------------------------------------------------------------------ check_supported
@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        (chat(logprobs=True), "chat", "logprobs"),
        (chat(top_logprobs=3), "chat", "top_logprobs"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "chat", "tools"),
        (chat(tool_choice="auto"), "chat", "tool_choice"),
        (chat(functions=[{"name": "f"}]), "chat", "functions"),
        (chat(function_call="auto"), "chat", "function_call"),
        (chat(logit_bias={"50256": -100}), "chat", "logit_bias"),
        (chat(n=2, stream=True), "chat", "n"),
        (chat(n=9), "chat", "n"),
        (chat(n=0), "chat", "n"),
        (chat(modalities=["text", "audio"]), "chat", "modalities"),
        (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "chat", "response_format"),
        (chat(response_format={"type": "grammar"}), "chat", "response_format"),
        (chat(min_p=0.1), "chat", "min_p"),
        (chat(repetition_penalty=1.2), "chat", "repetition_penalty"),
        (chat(guided_json={"type": "object"}), "chat", "guided_json"),
        (chat(stop=["a", "b", "c", "d", "e", "f"]), "chat", "stop"),
        (chat(stop=[1]), "chat", "stop"),
        (chat(temperature="hot"), "chat", "temperature"),
        (chat(max_tokens=0), "chat", "max_tokens"),
        (chat(messages=[]), "chat", "messages"),
        (chat(messages=[{"role": "system", "content": "only system"}]), "chat", "messages"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            "chat",
            "messages",
        ),
        (chat(messages=[*USER, {"role": "tool", "content": "42", "tool_call_id": "t"}]), "chat", "messages"),
        (chat(messages=[*USER, {"role": "assistant", "tool_calls": [{"id": "t"}]}]), "chat", "messages"),
        (comp(echo=True), "completion", "echo"),
        (comp(best_of=2), "completion", "best_of"),
        (comp(suffix="end"), "completion", "suffix"),
        (comp(logprobs=2), "completion", "logprobs"),
        (comp(prompt=["a", "b"]), "completion", "prompt"),
        (comp(prompt=[1, 2, 3]), "completion", "prompt"),
        (comp(prompt=""), "completion", "prompt"),
    ],
)
def test_unsupported_requests_are_rejected_with_param(body: dict[str, Any], kind: Any, param: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        check_supported(body, kind)
    assert info.value.param == param


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (chat(logprobs=False, top_logprobs=None, tools=[], tool_choice="none", logit_bias={}), "chat"),
        (chat(n=1, stream=True, stream_options={"include_usage": True}, user="u", metadata={"a": "b"}), "chat"),
        (chat(n=3), "chat"),
        (chat(response_format={"type": "text"}, modalities=["text"], repetition_penalty=1.0, top_k=-1), "chat"),
        (chat(messages=[*USER, {"role": "assistant", "content": None}, {"role": "user", "content": "x"}]), "chat"),
        (comp(echo=False, best_of=1, suffix=None, logprobs=None, prompt=["one"]), "completion"),
    ],
)
def test_supported_requests_pass(body: dict[str, Any], kind: Any) -> None:
    check_supported(body, kind)


# ------------------------------------------------------------------------------------ build_request
@pytest.mark.parametrize(
    ("extra", "config"),
    [
        ({}, {}),
        ({"temperature": 0, "top_p": 1}, {"temperature": 0.0, "top_p": 1.0}),
        ({"max_tokens": 10}, {"max_output_tokens": 10}),
        ({"max_tokens": 10, "max_completion_tokens": 20}, {"max_output_tokens": 20}),
        ({"stop": "END"}, {"stop_sequences": ["END"]}),
        ({"stop": ["a", "", "b"]}, {"stop_sequences": ["a", "b"]}),
        ({"n": 1}, {}),
        ({"n": 4}, {"candidate_count": 4}),
        ({"seed": 3, "top_k": 40}, {"seed": 3, "top_k": 40}),
        ({"presence_penalty": -1, "frequency_penalty": 2}, {"presence_penalty": -1.0, "frequency_penalty": 2.0}),
        ({"response_format": {"type": "json_object"}}, {"response_mime_type": "application/json"}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}},
            {"response_mime_type": "application/json", "response_json_schema": {"type": "object"}},
        ),
    ],
)
def test_generation_config_mapping(extra: dict[str, Any], config: dict[str, Any]) -> None:
    assert build_request(chat(**extra), "chat").config == config


def test_messages_map_roles_merge_turns_and_collect_system() -> None:
    req = build_request(
        chat(
            messages=[
                {"role": "system", "content": "S1"},
                {"role": "user", "content": "u1"},
                {"role": "user", "content": [{"type": "text", "text": "u2"}]},
                {"role": "developer", "content": [{"type": "text", "text": "D"}]},
                {"role": "assistant", "content": "a1", "name": "bot"},
                {"role": "assistant", "content": ""},
                {"role": "user", "content": "u3"},
            ]
        ),
        "chat",
    )
    assert req.model == "gemini-x"
    assert req.config == {"system_instruction": {"parts": [{"text": "S1"}, {"text": "D"}]}}
    assert req.contents == [
        {"role": "user", "parts": [{"text": "u1"}, {"text": "u2"}]},
        {"role": "model", "parts": [{"text": "a1"}]},
        {"role": "user", "parts": [{"text": "u3"}]},
    ]


def test_completion_prompt_is_one_user_turn() -> None:
    req = build_request(comp(prompt=["Once upon"]), "completion")
    assert req.contents == [{"role": "user", "parts": [{"text": "Once upon"}]}]


# ------------------------------------------------------------------------------------ responses
@pytest.mark.parametrize(
    ("gemini", "openai"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
        ("FINISH_REASON_UNSPECIFIED", None),
        (None, None),
    ],
)
def test_finish_reason_table(gemini: str | None, openai: str | None) -> None:
    assert finish_reason(gemini) == openai


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        (None, {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),
        (
            {"prompt_token_count": 5, "candidates_token_count": 7, "total_token_count": 12},
            {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        ),
        (
            {"prompt_token_count": 5, "candidates_token_count": 7, "thoughts_token_count": 3, "total_token_count": 15},
            {
                "prompt_tokens": 5,
                "completion_tokens": 10,
                "total_tokens": 15,
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
        ),
        ({"prompt_token_count": 4}, {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}),
    ],
)
def test_usage_table(meta: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    assert usage(meta) == expected


def _resp(*texts: str, finish: str | None = "STOP", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    cands = []
    for i, t in enumerate(texts):
        cand: dict[str, Any] = {"index": i, "content": {"role": "model", "parts": [{"text": t}]}}
        if finish:
            cand["finish_reason"] = finish
        cands.append(cand)
    out: dict[str, Any] = {"candidates": cands}
    if meta:
        out["usage_metadata"] = meta
    return out


def test_render_chat_skips_thought_parts_and_validates() -> None:
    resp = _resp("", meta={"prompt_token_count": 2, "candidates_token_count": 1})
    resp["candidates"][0]["content"]["parts"] = [{"text": "thinking...", "thought": True}, {"text": "Paris"}]
    body = render(resp, "chat", "alias", "rid", created=1)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content == "Paris" and parsed.id == "chatcmpl-rid" and parsed.created == 1


def test_render_blocked_prompt_is_one_filtered_choice() -> None:
    body = render({"prompt_feedback": {"block_reason": "SAFETY"}}, "completion", "alias", "rid")
    parsed = Completion.model_validate(body)
    assert [(c.text, c.finish_reason) for c in parsed.choices] == [("", "content_filter")]


def _parse(data: str) -> dict[str, Any]:
    assert data.startswith("data: ") and data.endswith("\n\n")
    parsed: dict[str, Any] = json.loads(data[len("data: ") :])
    return parsed


def test_stream_renderer_counts_tokens_from_upstream_usage() -> None:
    r = StreamRenderer("chat", "alias", "rid", include_usage=False)
    first = r.feed(_resp("Hello", finish=None))
    assert first is not None and first.tokens == 1
    assert _parse(first.data)["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert r.feed({"candidates": [], "usage_metadata": {"prompt_token_count": 3}}) is None  # nothing new
    last = r.feed(_resp(" world", meta={"prompt_token_count": 3, "candidates_token_count": 4}))
    assert last is not None and last.tokens == 3  # the upstream says 4 in total; 1 was counted already
    assert _parse(last.data)["choices"][0] == {
        "index": 0,
        "delta": {"content": " world"},
        "logprobs": None,
        "finish_reason": "stop",
    }
    (usage_chunk,) = r.close()
    assert usage_chunk.usage_only and usage_chunk.usage == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    for chunk in (first, last, usage_chunk):
        ChatCompletionChunk.model_validate(_parse(chunk.data))


def test_stream_renderer_refuses_to_close_a_stream_without_finish_reason() -> None:
    # An upstream stream that just stops was cut: reporting `stop` would pass a truncated answer as complete.
    r = StreamRenderer("completion", "alias", "rid", include_usage=True)
    assert r.feed(_resp("abc", finish=None)) is not None
    with pytest.raises(errors.ServiceUnavailable, match="without a finish reason"):
        r.close()


def test_stream_renderer_refuses_an_empty_upstream() -> None:
    with pytest.raises(errors.ServiceUnavailable, match="without a finish reason"):
        StreamRenderer("chat", "alias", "rid", include_usage=False).close()


def test_stream_renderer_closes_a_finished_stream_with_usage_only() -> None:
    r = StreamRenderer("completion", "alias", "rid", include_usage=True)
    r.feed(_resp("abc", finish="STOP"))
    (usage_chunk,) = r.close()
    assert not usage_chunk.usage_only and usage_chunk.usage == {
        "prompt_tokens": 0,
        "completion_tokens": 1,
        "total_tokens": 1,
    }


def test_stream_renderer_continuation_sends_no_role() -> None:
    r = StreamRenderer("chat", "alias", "rid", include_usage=False, continuation=True)
    first = r.feed(_resp(" more", finish=None))
    assert first is not None and _parse(first.data)["choices"][0]["delta"] == {"content": " more"}


# ------------------------------------------------------------------------------------ errors
RETRY_INFO = {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}]}}
KEY_INVALID = {
    "error": {"details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}
}


@pytest.mark.parametrize(
    ("code", "status", "message", "details", "header", "cls", "retry_after"),
    [
        (429, "RESOURCE_EXHAUSTED", "quota", None, None, errors.RateLimited, "5"),
        (429, "RESOURCE_EXHAUSTED", "quota", RETRY_INFO, None, errors.RateLimited, "3"),
        (429, None, "quota", None, "9", errors.RateLimited, "9"),
        (500, "INTERNAL", "boom", None, None, errors.ServiceUnavailable, None),
        (503, "UNAVAILABLE", "overloaded", None, None, errors.ServiceUnavailable, None),
        (504, "DEADLINE_EXCEEDED", "slow", None, None, errors.ServiceUnavailable, None),
        (408, None, "slow", None, None, errors.ServiceUnavailable, None),
        (401, "UNAUTHENTICATED", "no key", None, None, errors.ServiceUnavailable, None),
        (403, "PERMISSION_DENIED", "denied", None, None, errors.ServiceUnavailable, None),
        (400, "INVALID_ARGUMENT", "API key not valid.", KEY_INVALID, None, errors.ServiceUnavailable, None),
        (404, "NOT_FOUND", "models/x not found", None, None, errors.ServiceUnavailable, None),
        (400, "INVALID_ARGUMENT", "temperature out of range", None, None, errors.BadRequest, None),
        (413, None, "too large", None, None, errors.BadRequest, None),
    ],
)
def test_upstream_error_table(
    code: int,
    status: str | None,
    message: str,
    details: Any,
    header: str | None,
    cls: type[errors.APIError],
    retry_after: str | None,
) -> None:
    err = map_upstream_error(
        code, status, message, details, model="gemini-x", retry_after_s=5, retry_after_header=header
    )
    assert type(err) is cls
    assert err.headers.get("Retry-After") == retry_after
    if cls is errors.BadRequest:
        assert message in err.message
    if code == 404:
        assert "gemini-x" in err.message
