"""Model cards (/v1/models, /v1/models/{id}), the tokenizer endpoints' target, and the config knobs behind them."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.config import ConfigError, PoolConfig, RouteConfig, parse_config
from serve_app.errors import BadRequest, NotFound
from serve_app.surface import find_card, model_cards, tokenizer_target

ROUTES = {
    "chat": RouteConfig(pool="p"),
    "chat-sql": RouteConfig(pool="p", lora="sql"),
    "other-sql": RouteConfig(pool="q", lora="sql"),
    "flash": RouteConfig(policy="hosted_only", gemini_model="gemini-x"),
}
INFO = {"p": {"max_model_len": 4096, "served_model_name": "Base", "lora_adapters": [{"id": "sql", "root": "/a/sql"}]}}


def test_cards_carry_parent_root_and_max_model_len() -> None:
    cards = {c["id"]: c for c in model_cards(ROUTES, 7, INFO, {"p": "Base", "q": "Q"})}
    assert cards["chat"] == {
        "id": "chat",
        "object": "model",
        "created": 7,
        "owned_by": "serve_app",
        "policy": "self_hosted_only",
        "root": "Base",
        "parent": None,
        "max_model_len": 4096,
    }
    assert (cards["chat-sql"]["parent"], cards["chat-sql"]["root"]) == ("chat", "/a/sql")
    assert cards["chat-sql"]["max_model_len"] == 4096
    # No base route for pool q: the parent is the pool's served name; engine facts unknown yet.
    assert (cards["other-sql"]["parent"], "max_model_len" in cards["other-sql"]) == ("Q", False)
    assert (cards["flash"]["root"], cards["flash"]["parent"]) == ("gemini-x", None)


def test_find_card_404_is_model_not_found() -> None:
    cards = model_cards(ROUTES, 0)
    assert find_card(cards, "chat", [])["id"] == "chat"
    with pytest.raises(NotFound) as err:
        find_card(cards, "nope", sorted(ROUTES))
    assert err.value.status == 404 and err.value.body()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("body", "pools", "expected"),
    [
        ({"model": "chat", "prompt": "x"}, ["p", "q"], ("p", None)),
        ({"model": "chat-sql", "tokens": [1]}, ["p", "q"], ("p", "sql")),
        ({"prompt": "x"}, ["p"], ("p", None)),
        ({"prompt": "x"}, ["p", "q"], BadRequest),
        ({"model": 3}, ["p"], BadRequest),
        ({"model": "flash", "prompt": "x"}, ["p"], BadRequest),
        ({"model": "nope", "prompt": "x"}, ["p"], NotFound),
        ([1, 2], ["p"], BadRequest),
    ],
)
def test_tokenizer_target(body: Any, pools: list[str], expected: Any) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            tokenizer_target(ROUTES, body, pools)
    else:
        assert tokenizer_target(ROUTES, body, pools) == expected


def test_route_lora_must_be_an_adapter_of_its_pool() -> None:
    pools = {"p": {"model": "m", "vllm": {"lora_modules": {"sql": "/a/sql"}}}}
    parse_config({"pools": pools, "routes": {"s": {"pool": "p", "lora": "sql"}}})
    with pytest.raises(ConfigError, match=r"routes\.s\.lora: pool 'p' has no adapter 'sqll' \(has: \['sql'\]\)"):
        parse_config({"pools": pools, "routes": {"s": {"pool": "p", "lora": "sqll"}}}, "f.yaml")


@pytest.mark.parametrize(
    ("pool", "gpus"),
    [
        ({"model": "m"}, 1.0),
        ({"model": "m", "vllm": {"tensor_parallel_size": 4}}, 4.0),
        ({"model": "m", "vllm": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}}, 4.0),
        ({"model": "m", "vllm": {"tensor_parallel_size": 4}, "deployment": {"num_gpus": 1}}, 1.0),
        ({"model": "m", "vllm": {"cpu_kv_cache_space_gib": 1}}, 0.0),
        ({"model": "m", "vllm": {"device": "cpu"}}, 0.0),
        ({"model": "m", "engine": "simulated"}, 0.0),
        ({"model": "m", "engine": "simulated", "deployment": {"num_gpus": 0.5}}, 0.5),
    ],
)
def test_gpus_per_replica(pool: dict[str, Any], gpus: float) -> None:
    assert PoolConfig.model_validate(pool).gpus_per_replica() == gpus
