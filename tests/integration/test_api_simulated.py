"""The OpenAI API shapes through the real gateway and LLMServer deployments, with the simulated engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.integration.conftest import deploy
from tests.support import sim_pool

APP = "sim"


@pytest.fixture(scope="module")
def sim_base(ray_cluster: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    config = {
        "pools": {"sim": sim_pool(served_model_name="sim-engine")},
        "routes": {"sim-chat": {"policy": "self_hosted_only", "pool": "sim"}},
        "gateway": {"num_cpus": 0.1, "max_body_bytes": 4096},
    }
    yield deploy(ray_cluster, APP, config)
    serve.delete(APP)


@pytest.fixture()
def client(sim_base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim_base, api_key="unused", max_retries=0, timeout=30)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    ChatCompletion.model_validate(resp.model_dump())
    assert resp.model == "sim-chat"  # the alias the client asked for, not the engine's name
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].message.content


def test_chat_streaming_with_usage(sim_base: str) -> None:
    body = {
        "model": "sim-chat",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{sim_base}/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["x-served-by"] == "self-hosted"
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert all(c.model == "sim-chat" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 7
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7


def test_streaming_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim-chat", messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model="sim-chat", prompt="Once upon a time", max_tokens=4)
    Completion.model_validate(resp.model_dump())
    assert resp.model == "sim-chat" and resp.usage is not None and resp.usage.completion_tokens == 4
    stream = client.completions.create(model="sim-chat", prompt="Once", max_tokens=3, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices).split() != []


def test_models_and_health(client: openai.OpenAI, sim_base: str) -> None:
    assert [m.id for m in client.models.list()] == ["sim-chat"]
    assert httpx.get(sim_base.removesuffix("/v1") + "/health").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("content", "expected_status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
        (json.dumps({"model": "sim-chat"}).encode(), 400, "messages"),
        (
            json.dumps(
                {"model": "sim-chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}
            ).encode(),
            400,
            "max_tokens",
        ),
        (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model"),
        (json.dumps({"model": "sim-chat", "messages": [{"role": "user", "content": "x" * 5000}]}).encode(), 413, None),
        (
            json.dumps(
                {"model": "sim-chat", "messages": [{"role": "user", "content": "y " * 1900}], "max_tokens": 500}
            ).encode(),
            400,
            "max_tokens",
        ),
    ],
)
def test_bad_input_gets_openai_errors(sim_base: str, content: bytes, expected_status: int, param: str | None) -> None:
    r = httpx.post(
        f"{sim_base}/chat/completions", content=content, headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == expected_status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param
    if expected_status == 404:
        assert err["code"] == "model_not_found"


def test_unknown_path_is_openai_shaped(sim_base: str) -> None:
    r = httpx.get(f"{sim_base}/does-not-exist")
    assert r.status_code == 404 and "error" in r.json()


def test_bad_request_does_not_harm_others(client: openai.OpenAI, sim_base: str) -> None:
    httpx.post(f"{sim_base}/chat/completions", content=b"{", headers={"content-type": "application/json"})
    resp = client.chat.completions.create(model="sim-chat", messages=[{"role": "user", "content": "ok"}], max_tokens=2)
    assert resp.choices[0].message.content
