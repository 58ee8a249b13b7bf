"""Auth, client disconnects, and live route-table changes, on real Ray with the simulated engine."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import TEST_KEYS, TEST_KEYS_ENV, deploy_declarative
from tests.support import assert_not_in_ray_logs, sim_pool, wait_for

APP = "gw"


def _config(routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "pools": {"slow": sim_pool(simulated={"tokens_per_second": 20.0})},
        "routes": routes,
        "gateway": {"num_cpus": 0.1, "api_keys_env": TEST_KEYS_ENV},
    }


@pytest.fixture(scope="module")
def gw_base(ray_cluster: dict[str, Any]) -> Iterator[str]:
    from ray import serve

    yield deploy_declarative(ray_cluster, APP, _config({"slow": {"pool": "slow"}}))
    serve.delete(APP)


def _stats() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer-slow", app_name=APP)
    result: dict[str, Any] = handle.stats.remote().result(timeout_s=10)
    return result


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic sk-test-alpha-123", "Bearer"])
def test_missing_or_wrong_key_is_401(gw_base: str, header: str | None) -> None:
    headers = {"authorization": header} if header is not None else {}
    body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    r = httpx.post(f"{gw_base}/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["type"] == "authentication_error"
    assert not any(k in r.text for k in TEST_KEYS)
    assert httpx.get(f"{gw_base}/models", headers=headers).status_code == 401


def test_valid_keys_pass_and_health_stays_open(gw_base: str) -> None:
    for key in TEST_KEYS:
        client = openai.OpenAI(base_url=gw_base, api_key=key, max_retries=0, timeout=30)
        resp = client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert resp.choices[0].message.content
    assert httpx.get(gw_base.removesuffix("/v1") + "/health").status_code == 200


def test_client_disconnect_aborts_engine_request(gw_base: str) -> None:
    assert _stats()["running"] == 0
    body = {"model": "slow", "messages": [{"role": "user", "content": "long"}], "max_tokens": 1000, "stream": True}
    headers = {"authorization": f"Bearer {TEST_KEYS[0]}"}
    with httpx.stream("POST", f"{gw_base}/chat/completions", json=body, headers=headers, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(line.startswith("data: ") for line in got)
        assert _stats()["running"] == 1
    # 1000 tokens at 20 tok/s would take 50 s: the sequence must stop long before.
    wait_for(lambda: _stats()["running"] == 0, timeout=10, what="engine running count back to 0")


def test_route_change_is_live_and_keeps_engines(ray_cluster: dict[str, Any], gw_base: str) -> None:
    before = _stats()["replica_id"]
    client = openai.OpenAI(base_url=gw_base, api_key=TEST_KEYS[0], max_retries=0, timeout=30)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="renamed", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    deploy_declarative(ray_cluster, APP, _config({"renamed": {"pool": "slow"}}))
    resp = client.chat.completions.create(model="renamed", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert resp.model == "renamed"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="slow", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    assert _stats()["replica_id"] == before  # the engine replica was not restarted
    deploy_declarative(ray_cluster, APP, _config({"slow": {"pool": "slow"}}))


def test_admin_pools_reports_load(gw_base: str) -> None:
    headers = {"authorization": f"Bearer {TEST_KEYS[1]}"}

    def pool_view() -> dict[str, Any] | None:
        r = httpx.get(gw_base.removesuffix("/v1") + "/admin/pools", headers=headers)
        view: dict[str, Any] = r.json()["pools"]["slow"]
        return view if view["replicas"] == 1 else None

    view = wait_for(pool_view, timeout=10, what="pool load reported")
    assert set(view) >= {"replicas", "waiting", "running", "kv_cache_usage", "saturated", "breaker"}
    # The shipped Ray environment reached the gateway: its calls to the engines go over gRPC.
    whole = httpx.get(gw_base.removesuffix("/v1") + "/admin/pools", headers=headers).json()
    assert whole["transport"] == "grpc"


def test_keys_never_logged(gw_base: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for key in (*TEST_KEYS, "sk-wrong-key-xyz"):
        httpx.post(f"{gw_base}/chat/completions", json={"model": "slow"}, headers={"authorization": f"Bearer {key}"})
    assert not any(k in json.dumps([r.getMessage() for r in caplog.records]) for k in TEST_KEYS)
    for key in (*TEST_KEYS, "sk-wrong-key-xyz"):  # the gateway replicas' own logs too
        assert_not_in_ray_logs(key)
