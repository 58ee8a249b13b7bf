"""The interface every engine implements; the LLMServer replica only talks to this."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from serve_app.protocol import EngineLoad, Reply


class Engine(Protocol):
    """One inference engine inside one replica.

    `chat` / `completion` take the OpenAI request body as the client sent it (with `model` already set to
    the engine's served model name) and yield Reply items (see serve_app.protocol). Validation failures
    and context-length errors are yielded as ErrorReply with status 400, never raised. Streaming replies
    always carry usage on the last chunk (`usage_only=True` when the client did not ask for it).
    Cancelling the iterator (client went away) must abort the request inside the engine.
    """

    served_model_name: str

    async def start(self) -> None:
        """Load the model; return when the engine can take requests."""

    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        """POST /v1/chat/completions semantics."""
        ...

    def completion(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        """POST /v1/completions semantics."""
        ...

    def load(self) -> EngineLoad:
        """Current scheduler load: waiting, running, KV-cache usage, generated tokens so far."""
        ...

    def info(self) -> dict[str, Any]:
        """Static facts once started: kv_cache_tokens, max_model_len, served_model_name, model."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine is dead."""

    async def shutdown(self) -> None:
        """Release the engine (and its processes)."""
