"""The OpenAI / vLLM surface beside chat and completions: model cards and the tokenizer endpoints' target.

Pure functions over the route table (no Ray, no vLLM), used by the gateway:
- `model_cards`: `/v1/models` and `/v1/models/{id}`. One card per client-facing alias, the shape `vllm serve`
  gives (`id`, `object`, `created`, `owned_by`, `root`, `parent`, `max_model_len`) plus our `policy`. A
  route that names a LoRA adapter has `parent` = the alias of its base model (a route to the same pool
  without an adapter), or the pool's served name when no such route exists — as vLLM sets `parent` to
  the base model for its adapters.
- `tokenizer_target`: which pool (and adapter) a `/tokenize` or `/detokenize` body's `model` selects.
"""

from __future__ import annotations

from typing import Any

from serve_app.config import RouteConfig
from serve_app.errors import BadRequest, NotFound


def model_cards(
    routes: dict[str, RouteConfig],
    created: int,
    pool_info: dict[str, dict[str, Any]] | None = None,
    served_names: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Cards in alias order; `pool_info` holds each pool's engine facts (max_model_len, adapters) when known."""
    info, served = pool_info or {}, served_names or {}
    base_alias = {
        r.pool: a for a, r in sorted(routes.items()) if r.pool and r.lora is None and r.policy != "hosted_only"
    }
    cards = []
    for alias, r in sorted(routes.items()):
        card: dict[str, Any] = {"id": alias, "object": "model", "created": created, "owned_by": "serve_app"}
        card["policy"] = r.policy
        if r.policy == "hosted_only" or r.pool is None:
            card.update(root=r.gemini_model, parent=None)
        else:
            facts = info.get(r.pool, {})
            adapters = {a["id"]: a for a in facts.get("lora_adapters", [])}
            if r.lora is not None:
                parent = base_alias.get(r.pool) or served.get(r.pool, r.pool)
                card.update(root=adapters.get(r.lora, {}).get("root", r.lora), parent=parent)
            else:
                card.update(root=facts.get("served_model_name", served.get(r.pool, r.pool)), parent=None)
            if "max_model_len" in facts:
                card["max_model_len"] = facts["max_model_len"]
        cards.append(card)
    return cards


def find_card(cards: list[dict[str, Any]], model_id: str, known: list[str]) -> dict[str, Any]:
    for card in cards:
        if card["id"] == model_id:
            return card
    raise NotFound(f"The model {model_id!r} does not exist. Available: {known}", param="model")


def tokenizer_target(routes: dict[str, RouteConfig], body: Any, pools: list[str]) -> tuple[str, str | None]:
    """(pool, adapter) for a /tokenize or /detokenize body; the client's alias is resolved as for chat.

    Without `model` (optional in vLLM's request) the only pool is used; hosted-only aliases have no tokenizer.
    """
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        if len(pools) == 1:
            return pools[0], None
        raise BadRequest("'model' is required: this application serves several pools", param="model")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    route = routes.get(model)
    if route is None:
        raise NotFound(f"The model {model!r} does not exist. Available: {sorted(routes)}", param="model")
    if route.pool is None or route.policy == "hosted_only":
        raise BadRequest(f"the model {model!r} is served by Gemini only: it has no tokenizer here", param="model")
    return route.pool, route.lora
