"""Pure pieces of the gateway: auth, request parsing, error bodies, SSE rendering, the pool monitor."""

from __future__ import annotations

import json
import math

import pytest

from serve_app.config import RouteConfig, SaturationThresholds
from serve_app.errors import APIError, BadRequest, NotFound, RateLimited, Unauthorized, status_error
from serve_app.gateway import check_auth, load_api_keys, parse_request
from serve_app.pools import PoolMonitor
from serve_app.protocol import DONE, sse, sse_error, wants_usage
from serve_app.requests import load_json

KEYS = ["sk-one", "sk-two"]


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("Bearer sk-one", True),
        ("bearer sk-two", True),
        ("Bearer sk-three", False),
        (None, False),
        ("sk-one", False),
        ("Basic sk-one", False),
        ("Bearer", False),
    ],
)
def test_check_auth(header: str | None, ok: bool) -> None:
    if ok:
        check_auth(header, KEYS)
        return
    with pytest.raises(Unauthorized) as info:
        check_auth(header, KEYS)
    assert "sk-one" not in info.value.message and info.value.status == 401


def test_auth_off_when_not_configured() -> None:
    check_auth(None, None)
    assert load_api_keys(None) is None


def test_load_api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SA_KEYS", " a , b,,")
    assert load_api_keys("SA_KEYS") == ["a", "b"]
    monkeypatch.setenv("SA_KEYS", "")
    with pytest.raises(ValueError, match="holds no keys"):
        load_api_keys("SA_KEYS")


@pytest.mark.parametrize(
    ("raw", "kind", "param"),
    [
        (b"{", "chat", None),
        (b"\xff\xfe", "chat", None),
        (b'"a string"', "chat", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "chat", "model"),
        (b'{"model": 3, "messages": []}', "chat", "model"),
        (b'{"model": "m", "messages": []}', "chat", "messages"),
        (b'{"model": "m", "messages": ["hi"]}', "chat", "messages.0"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "chat", "stream"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream_options": 1}', "chat", "stream_options"),
        (b'{"model": "m"}', "completion", "prompt"),
        # found by tests/integration/test_fuzz.py (were 500s):
        (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "completion", None),  # int digits
        (b'{"model": "m", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "chat", None),
        (b'{"model": "\\ud800", "messages": [{"role": "user"}]}', "chat", None),
        (b'{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}', "chat", None),
    ],
)
def test_parse_request_rejects_with_param(raw: bytes, kind: str, param: str | None) -> None:
    with pytest.raises(BadRequest) as info:
        parse_request(raw, kind)
    assert info.value.param == param and info.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"a": ' * 10_000 + b"1" + b"}" * 10_000,
        b'{"model": "m", "tokens": [' + b"1" * 4301 + b"]}",
        b'{"model": "m", "prompt": "\\ud800"}',
        b"\xed\xa0\x80",
        b"",
    ],
)
def test_load_json_turns_every_bad_body_into_a_400(raw: bytes) -> None:
    """/tokenize and /detokenize read their body with load_json: the same 400s as chat (were 500s)."""
    with pytest.raises(BadRequest) as info:
        load_json(raw)
    assert info.value.status == 400 and info.value.message.startswith(("malformed JSON", "request body holds"))


def test_load_json_keeps_any_json_value() -> None:
    assert load_json(b'{"model": "m", "tokens": [1, 2]}') == {"model": "m", "tokens": [1, 2]}
    assert load_json(b'"\\u00e9"') == "\u00e9" and load_json(b"[" * 50 + b"]" * 50) is not None


def test_parse_request_passes_unknown_fields_through() -> None:
    body = parse_request(b'{"model": "m", "prompt": "x", "logprobs": 2, "seed": 7}', "completion")
    assert body["logprobs"] == 2 and body["seed"] == 7


@pytest.mark.parametrize(
    ("status", "cls", "code"),
    [
        (400, BadRequest, None),
        (404, NotFound, "model_not_found"),
        (429, RateLimited, "rate_limit_exceeded"),
        (401, Unauthorized, "invalid_api_key"),
        (502, APIError, "upstream_error"),
    ],
)
def test_status_error_mapping(status: int, cls: type[APIError], code: str | None) -> None:
    err = status_error(status, "msg", param="p")
    assert isinstance(err, cls) and err.status == status
    assert err.body() == {"error": {"message": "msg", "type": err.type, "param": "p", "code": code}}


def test_sse_rendering() -> None:
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert DONE == "data: [DONE]\n\n"
    event = json.loads(sse_error(503, {"error": {"message": "down", "type": "x"}}).removeprefix("data: "))
    assert event == {"error": {"message": "down", "type": "x", "code": 503}}
    assert wants_usage({"stream_options": {"include_usage": True}})
    assert not wants_usage({"stream_options": None}) and not wants_usage({})


def test_pool_monitor_tracks_saturation_with_staleness() -> None:
    th = SaturationThresholds(max_waiting_per_replica=2, stale_after_s=3, max_inflight_per_replica=4)
    mon = PoolMonitor()
    mon.configure({"a": RouteConfig(pool="p", saturation=th)})
    assert mon.saturated("p")  # nothing reported yet: fail closed
    mon.update({"p": {"r1": (100.0, {"waiting": 1, "running": 3, "kv_cache_usage": 0.2})}}, now_wall=100.5)
    assert not mon.saturated("p")
    mon.update({"p": {"r1": (100.0, {"waiting": 5, "running": 3})}}, now_wall=101.0)
    assert mon.saturated("p")
    mon.update({"p": {"r1": (101.0, {"waiting": 0})}}, now_wall=101.2)
    assert not mon.saturated("p")
    mon.pools["p"].inflight = 4  # the gateway's own in-flight count between refreshes
    assert mon.saturated("p")
    mon.pools["p"].inflight = 0
    mon.update({"p": {"r1": (101.0, {"waiting": 0})}}, now_wall=110.0)  # the replica went silent
    assert mon.saturated("p")
    desc = mon.describe()["p"]
    assert desc["replicas"] == 1 and desc["saturation_score"] is None and desc["breaker"] == "closed"
    assert math.isclose(desc["max_load_age_s"], 9.0)
