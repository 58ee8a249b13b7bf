"""A simulated engine: a test double with a capacity model, for load, autoscaling and spill tests.

Capacity model: at most `max_num_seqs` sequences decode at once, each at `tokens_per_second` after a
`first_token_delay_s` prefill; the rest wait in FIFO order. Output is deterministic text. It speaks the same
Reply protocol as the vLLM engine, with OpenAI-shaped bodies. It is never a default and never served by
`make run`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from serve_app.config import PoolConfig
from serve_app.errors import error_body
from serve_app.protocol import ChunkReply, EngineLoad, ErrorReply, JSONReply, Reply, sse, wants_usage

logger = logging.getLogger(__name__)

_WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "again.")
_MAX_BATCH_WAIT_S = 0.02  # at very high token rates, emit the tokens that came due together


class SimulatedError(RuntimeError):
    """Raised by the failure hooks (a replica 'crashing')."""


def _bad(message: str, param: str | None) -> ErrorReply:
    return ErrorReply(400, error_body(message, "BadRequestError", param, 400))


def count_prompt_tokens(body: dict[str, Any], kind: str) -> int | ErrorReply:
    """Whitespace words plus a small per-message overhead, like a chat template adds."""
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad("messages must be a non-empty list", "messages")
        total = 0
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or "role" not in msg:
                return _bad("each message needs a role", f"messages.{i}")
            content = msg.get("content") or ""
            if isinstance(content, list):
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            total += len(str(content).split()) + 4
        return total
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return _bad("prompt must be a string", "prompt")
    return len(prompt.split())


class SimulatedEngine:
    """Deterministic tokens at a configured rate with a bounded number of concurrent sequences."""

    def __init__(self, pool_name: str, pool: PoolConfig) -> None:
        self.served_model_name = pool.served_model_name or pool_name
        self._cfg = pool.simulated
        self._running = 0
        self._waiting = 0
        self._tokens_in_flight = 0
        self._generated = 0
        self._slot_free = asyncio.Condition()
        self.fail_before_first_token = self._cfg.fail_before_first_token
        self.fail_after_tokens = self._cfg.fail_after_tokens
        self.error_style = "raise"  # raise (a crash) | event (vLLM: an error event inside a 200 stream)
        self.engine_dead = False  # like a dead EngineCore: load() unhealthy, every request fails
        # Cleared while "hung", like a SIGSTOPped EngineCore: no tokens, and the load it reports is the
        # last it sent, plus requests that reached it since (a stopped engine never sees their aborts).
        self._unhung = asyncio.Event()
        self._unhung.set()
        self._frozen = EngineLoad()
        self._stuck = 0

    def set_faults(
        self,
        fail_before_first_token: bool | None = None,
        fail_after_tokens: int | None = -1,
        error_style: str | None = None,
        engine_dead: bool | None = None,
        hang: bool | None = None,
    ) -> None:
        """Test hook: change the failure injection at run time (fail_after_tokens=None: never)."""
        if fail_before_first_token is not None:
            self.fail_before_first_token = fail_before_first_token
        if fail_after_tokens is None or fail_after_tokens >= 0:
            self.fail_after_tokens = fail_after_tokens
        if error_style is not None:
            if error_style not in ("raise", "event"):
                raise ValueError(f"error_style must be raise or event, not {error_style!r}")
            self.error_style = error_style
        if engine_dead is not None:
            self.engine_dead = engine_dead
        if hang is not None:
            if hang:
                self._frozen = self.load()
                self._unhung.clear()
            else:
                self._stuck = 0
                self._unhung.set()

    async def start(self) -> None:
        logger.info("simulated engine %s ready (%s)", self.served_model_name, self._cfg.model_dump())

    def load(self) -> EngineLoad:
        if not self._unhung.is_set():
            f = self._frozen
            return EngineLoad(f.waiting, f.running + self._stuck, f.kv_cache_usage, f.generated_tokens_total)
        capacity = self._cfg.max_num_seqs * self._cfg.max_model_len
        return EngineLoad(
            waiting=self._waiting,
            running=self._running,
            kv_cache_usage=min(1.0, self._tokens_in_flight / capacity),
            generated_tokens_total=self._generated,
            healthy=not self.engine_dead,
        )

    def info(self) -> dict[str, Any]:
        return {
            "served_model_name": self.served_model_name,
            "max_model_len": self._cfg.max_model_len,
            "max_num_seqs": self._cfg.max_num_seqs,
            "kv_cache_tokens": self._cfg.max_num_seqs * self._cfg.max_model_len,
            "engine": "simulated",
        }

    async def check_health(self) -> None:
        if self.engine_dead:
            raise SimulatedError("simulated engine is dead")

    async def shutdown(self) -> None:
        return None

    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        return self._generate(body, request_id, "chat")

    def completion(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        return self._generate(body, request_id, "completion")

    # ------------------------------------------------------------------------------------------ internals
    def _max_tokens(self, body: dict[str, Any], prompt_tokens: int) -> int | ErrorReply:
        room = self._cfg.max_model_len - prompt_tokens
        if room <= 0:
            return _bad(
                f"This model's maximum context length is {self._cfg.max_model_len} tokens. However, your "
                f"prompt has {prompt_tokens} tokens.",
                "messages" if "messages" in body else "prompt",
            )
        for key in ("max_completion_tokens", "max_tokens"):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return _bad(f"{key} must be a positive integer", key)
            if value > room:
                return _bad(
                    f"{key} ({value}) is too large: the prompt uses {prompt_tokens} of "
                    f"{self._cfg.max_model_len} context tokens",
                    key,
                )
            return value
        return min(room, 256)

    def _validate(self, body: dict[str, Any], kind: str) -> tuple[int, int] | ErrorReply:
        prompt_tokens = count_prompt_tokens(body, kind)
        if isinstance(prompt_tokens, ErrorReply):
            return prompt_tokens
        n = body.get("n", 1)
        if n not in (None, 1):
            return _bad("the simulated engine supports n=1 only", "n")
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, int | float) or isinstance(temperature, bool)):
            return _bad("temperature must be a number", "temperature")
        max_tokens = self._max_tokens(body, prompt_tokens)
        if isinstance(max_tokens, ErrorReply):
            return max_tokens
        return prompt_tokens, max_tokens

    async def _acquire(self) -> None:
        self._waiting += 1
        try:
            async with self._slot_free:
                await self._slot_free.wait_for(lambda: self._running < self._cfg.max_num_seqs)
                self._running += 1
        finally:
            self._waiting -= 1

    async def _release(self) -> None:
        self._running -= 1
        async with self._slot_free:
            self._slot_free.notify(1)

    async def _generate(self, body: dict[str, Any], request_id: str, kind: str) -> AsyncIterator[Reply]:
        checked = self._validate(body, kind)
        if isinstance(checked, ErrorReply):
            yield checked
            return
        prompt_tokens, max_tokens = checked
        cap = self._cfg.max_waiting
        if cap is not None and self._waiting >= cap and self._running >= self._cfg.max_num_seqs:
            yield ErrorReply(503, error_body("simulated engine queue is full", "ServiceUnavailable", None, 503))
            return
        if self.engine_dead:
            raise SimulatedError("simulated engine is dead")
        shape = _Shape(kind, request_id, self.served_model_name, body)
        offset = continued_words(body, kind)
        stream = bool(body.get("stream"))
        if not self._unhung.is_set():
            self._stuck += 1
        await self._acquire()
        self._tokens_in_flight += prompt_tokens
        produced = 0
        try:
            if stream and kind == "chat":
                yield ChunkReply(shape.role_chunk())  # vLLM sends the role before any token
            if self.fail_before_first_token:
                if stream and self.error_style == "event":
                    yield ChunkReply(sse(_engine_error()))
                    return
                raise SimulatedError("simulated failure before the first token")
            await asyncio.sleep(self._cfg.first_token_delay_s)
            text: list[str] = []
            async for words in self._tokens(max_tokens, offset):
                await self._unhung.wait()
                produced += len(words)
                self._generated += len(words)
                self._tokens_in_flight += len(words)
                fail_at = self.fail_after_tokens
                if fail_at is not None and produced > fail_at:
                    if stream and self.error_style == "event":
                        yield ChunkReply(sse(_engine_error()))
                        return
                    raise SimulatedError("simulated failure mid-stream")
                if stream:
                    yield ChunkReply("".join(shape.delta(w) for w in words), tokens=len(words))
                else:
                    text.extend(words)
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": produced,
                "total_tokens": prompt_tokens + produced,
            }
            if stream:
                yield ChunkReply(shape.finish("length"))
                yield ChunkReply(shape.usage(usage), usage=usage, usage_only=not wants_usage(body))
            else:
                yield JSONReply(shape.whole("".join(text), usage))
        finally:
            self._tokens_in_flight -= prompt_tokens + produced
            await self._release()

    async def _tokens(self, max_tokens: int, offset: int = 0) -> AsyncIterator[list[str]]:
        """Words at the configured rate; tokens that come due together are yielded together."""
        interval = 1.0 / self._cfg.tokens_per_second
        start = time.monotonic()
        sent = 0
        while sent < max_tokens:
            due = min(max_tokens, int((time.monotonic() - start) / interval) + 1)
            if due > sent:
                yield [_WORDS[(offset + i) % len(_WORDS)] + " " for i in range(sent, due)]
                sent = due
            if sent < max_tokens:
                await asyncio.sleep(max(interval - (time.monotonic() - start) % interval, 0) or _MAX_BATCH_WAIT_S)


def _engine_error() -> dict[str, Any]:
    """The event vLLM's serving layer writes into a 200 stream when the engine fails."""
    return {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "code": 500}}


def continued_words(body: dict[str, Any], kind: str) -> int:
    """How many answer words a continuation request already holds, so the text goes on where it broke.

    Chat: the words of the final assistant message when `continue_final_message` is set. Completions: the
    longest tail of the prompt that is the start of the answer sequence. The answer text is the same
    sequence for every request, so "no duplicated and no missing text" can be checked exactly.
    """
    if kind == "chat":
        messages = body.get("messages") or []
        last = messages[-1] if messages else None
        if body.get("continue_final_message") and isinstance(last, dict) and last.get("role") == "assistant":
            return len(str(last.get("content") or "").split())
        return 0
    prompt = body.get("prompt")
    words = str(prompt[0] if isinstance(prompt, list) and prompt else prompt or "").split()
    for start in range(len(words)):
        tail = words[start:]
        if all(w == _WORDS[i % len(_WORDS)] for i, w in enumerate(tail)):
            return len(tail)
    return 0


class _Shape:
    """OpenAI response shapes for one request (chat or completion)."""

    def __init__(self, kind: str, request_id: str, model: str, body: dict[str, Any]) -> None:
        self.kind = kind
        self.model = model
        self.created = int(time.time())
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = f"{prefix}-{request_id}"
        self.chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        payload: dict[str, Any] = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            payload["usage"] = usage
        return sse(payload)

    def role_chunk(self) -> str:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])

    def delta(self, word: str) -> str:
        if self.kind == "chat":
            return self._chunk([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
        return self._chunk([{"index": 0, "text": word, "logprobs": None, "finish_reason": None}])

    def finish(self, reason: str) -> str:
        if self.kind == "chat":
            return self._chunk([{"index": 0, "delta": {}, "finish_reason": reason}])
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: dict[str, Any]) -> str:
        return self._chunk([], usage)

    def whole(self, text: str, usage: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
                "logprobs": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }
