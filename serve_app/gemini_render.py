"""Gemini → OpenAI response rendering, as pure functions over plain dicts (no SDK import here).

Inputs are Gemini responses as the adapter dumps them from the SDK (`model_dump(mode="json",
exclude_none=True)`: snake_case keys such as `candidates[].finish_reason`, `usage_metadata`). Outputs are
OpenAI bodies (chat.completion, text_completion) and, for streams, `ChunkReply` items whose `data` is
ready SSE text.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from serve_app.protocol import ChunkReply, sse

Kind = Literal["chat", "completion"]

_FINISH = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def finish_reason(gemini: str | None) -> str | None:
    """OpenAI finish_reason for a Gemini finishReason; None while generation goes on.

    Reasons with no OpenAI counterpart (OTHER, LANGUAGE, MALFORMED_FUNCTION_CALL, ...) end the choice as
    "stop": the text so far is all there is, and OpenAI clients only know the values above.
    """
    if not gemini or gemini == "FINISH_REASON_UNSPECIFIED":
        return None
    return _FINISH.get(gemini, "stop")


def usage(meta: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage from Gemini usageMetadata; thinking tokens count as completion (they are billed so)."""
    meta = meta or {}
    prompt = int(meta.get("prompt_token_count") or 0)
    thoughts = int(meta.get("thoughts_token_count") or 0)
    completion = int(meta.get("candidates_token_count") or 0) + thoughts
    total = max(int(meta.get("total_token_count") or 0), prompt + completion)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}
    if thoughts:
        out["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return out


def candidate_text(candidate: dict[str, Any]) -> str:
    """The answer text of one candidate; thought summaries are not part of the answer."""
    parts = (candidate.get("content") or {}).get("parts") or []
    return "".join(p.get("text") or "" for p in parts if not p.get("thought"))


def _candidates(resp: dict[str, Any]) -> list[dict[str, Any]]:
    cands = list(resp.get("candidates") or [])
    if not cands and (resp.get("prompt_feedback") or {}).get("block_reason"):
        # The prompt itself was blocked: no candidate at all. OpenAI's nearest shape is an empty choice
        # that ended on the content filter.
        cands = [{"index": 0, "finish_reason": "SAFETY"}]
    return cands


def _index(candidate: dict[str, Any], position: int) -> int:
    idx = candidate.get("index")
    return idx if isinstance(idx, int) else position


def response_id(kind: Kind, request_id: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{request_id}"


def render(resp: dict[str, Any], kind: Kind, alias: str, request_id: str, created: int | None = None) -> dict[str, Any]:
    """A whole non-streaming OpenAI body (chat.completion or text_completion)."""
    choices: list[dict[str, Any]] = []
    for pos, cand in enumerate(_candidates(resp)):
        text = candidate_text(cand)
        reason = finish_reason(cand.get("finish_reason")) or "stop"
        if kind == "chat":
            message = {"role": "assistant", "content": text}
            choices.append({"index": _index(cand, pos), "message": message, "logprobs": None, "finish_reason": reason})
        else:
            choices.append({"index": _index(cand, pos), "text": text, "logprobs": None, "finish_reason": reason})
    choices.sort(key=lambda c: c["index"])
    return {
        "id": response_id(kind, request_id),
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()) if created is None else created,
        "model": alias,
        "choices": choices,
        "usage": usage(resp.get("usage_metadata")),
    }


class StreamRenderer:
    """Turns Gemini stream events into OpenAI chunks, one `ChunkReply` per event that carries something.

    The first chunk carries `delta.role = "assistant"` (chat) together with the first text, so the very
    first item the gateway sees already holds the first token. Only candidate 0 is rendered: streams
    with n > 1 are refused up front.
    """

    def __init__(self, kind: Kind, alias: str, request_id: str, *, include_usage: bool) -> None:
        self.kind, self.alias, self.include_usage = kind, alias, include_usage
        self.id = response_id(kind, request_id)
        self.created = int(time.time())
        self.started = False
        self.finished = False
        self.counted = 0  # completion tokens reported in `ChunkReply.tokens` so far
        self.meta: dict[str, Any] | None = None

    def feed(self, resp: dict[str, Any]) -> ChunkReply | None:
        """The chunk for one upstream event, or None when it carries nothing for the client."""
        if resp.get("usage_metadata"):
            self.meta = resp["usage_metadata"]
        cands = _candidates(resp)
        cand = cands[0] if cands else {}
        text = candidate_text(cand)
        reason = finish_reason(cand.get("finish_reason"))
        if self.started and not text and reason is None:
            return None
        tokens = self._tokens(text)
        data = self._event(text, reason)
        self.started = True
        self.finished = self.finished or reason is not None
        return ChunkReply(data=data, tokens=tokens)

    def close(self) -> list[ChunkReply]:
        """Chunks after the upstream ended: a finish chunk if none came, then the usage chunk."""
        out: list[ChunkReply] = []
        if not self.finished:
            # The upstream ended without a finish reason; clients still need a terminal choice.
            out.append(ChunkReply(data=self._event("", "stop")))
            self.started = self.finished = True
        final = usage(self.meta)
        if not self.meta:
            final = {"prompt_tokens": 0, "completion_tokens": self.counted, "total_tokens": self.counted}
        body = {"id": self.id, "object": self._object(), "created": self.created, "model": self.alias}
        body |= {"choices": [], "usage": final}
        out.append(ChunkReply(data=sse(body), usage=final, usage_only=not self.include_usage))
        return out

    def _tokens(self, text: str) -> int:
        # Prefer the upstream's cumulative count; fall back to one token per non-empty text delta.
        cumulative = 0
        if self.meta:
            cumulative = int(self.meta.get("candidates_token_count") or 0)
            cumulative += int(self.meta.get("thoughts_token_count") or 0)
        tokens = max(cumulative - self.counted, 1 if text else 0)
        self.counted += tokens
        return tokens

    def _object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _event(self, text: str, reason: str | None) -> str:
        choice: dict[str, Any] = {"index": 0}
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if not self.started:
                delta["role"] = "assistant"
            if text or not self.started:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = reason
        body = {"id": self.id, "object": self._object(), "created": self.created, "model": self.alias}
        body["choices"] = [choice]
        return sse(body)
