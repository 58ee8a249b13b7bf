"""Gemini → OpenAI response rendering, as pure functions over plain dicts (no SDK import here).

Inputs are Gemini responses as the adapter dumps them from the SDK (`model_dump(mode="json",
exclude_none=True)`: snake_case keys such as `candidates[].finish_reason`, `usage_metadata`). Outputs are
OpenAI bodies (chat.completion, text_completion) and, for streams, `ChunkReply` items whose `data` is
ready SSE text.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal

from serve_app import errors
from serve_app.errors import ServiceUnavailable
from serve_app.protocol import ChunkReply, sse

Kind = Literal["chat", "completion"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
MAX_RETRY_AFTER_S = 3600  # upstream retry delays are clamped to this (a malformed one must not overflow)

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
    first item the gateway sees already holds the first token; a continuation (`continuation=True`: the
    client's stream already had its role) sends no role. Only candidate 0 is rendered: streams with n > 1
    are refused up front.
    """

    def __init__(
        self, kind: Kind, alias: str, request_id: str, *, include_usage: bool, continuation: bool = False
    ) -> None:
        self.kind, self.alias, self.include_usage = kind, alias, include_usage
        self.continuation = continuation
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
        """The usage chunk after the upstream ended with a finish reason.

        An upstream stream that ends without one was cut (connection dropped, proxy timeout): the answer is
        incomplete, so it is an error (ServiceUnavailable), never a `stop` the client would take as complete.
        """
        if not self.finished:
            raise ServiceUnavailable("the hosted model's stream ended without a finish reason (incomplete answer)")
        out: list[ChunkReply] = []
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
            if not self.started and not self.continuation:
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


# ----------------------------------------------------------------------------- upstream errors
def map_upstream_error(
    code: int,
    status: str | None,
    message: str,
    details: Any,
    *,
    model: str,
    retry_after_s: int,
    retry_after_header: str | None = None,
) -> errors.APIError:
    """The APIError for a Gemini HTTP error (code, status, message, raw error JSON)."""
    label = f"HTTP {code}{' ' + status if status else ''}"
    if code == 429:
        delay = _retry_delay(details, retry_after_header)
        seconds = delay if delay is not None else retry_after_s
        return errors.RateLimited(
            f"the hosted model is rate-limited ({label}); retry after {seconds} s",
            headers={"Retry-After": str(seconds)},
        )
    if code in (401, 403) or (code == 400 and _is_key_error(status, message, details)):
        return errors.ServiceUnavailable(f"the hosted model rejected the gateway's credentials ({label})")
    if code == 404:
        return errors.ServiceUnavailable(f"hosted model {model!r} is not available upstream ({label})")
    if code == 408 or code >= 500 or code == 0:
        return errors.ServiceUnavailable(f"the hosted model is unavailable ({label})")
    detail = message or "no message"
    return errors.BadRequest(f"the hosted model rejected the request ({label}): {detail}")


def _is_key_error(status: str | None, message: str, details: Any) -> bool:
    # Gemini reports a wrong key as 400 INVALID_ARGUMENT with reason API_KEY_INVALID in its details.
    reasons = {d.get("reason") for d in _detail_items(details)}
    return bool(reasons & {"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED"}) or "api key" in message.lower()


def _retry_delay(details: Any, header: str | None) -> int | None:
    """Seconds from google.rpc.RetryInfo (`"retryDelay": "17s"`) or an HTTP Retry-After header."""
    for item in _detail_items(details):
        if str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return _clamp_delay(float(match.group(1)))
    if header and header.strip().isdigit():
        return _clamp_delay(float(header.strip()))
    return None


def _clamp_delay(seconds: float) -> int:
    """Whole seconds in [1, MAX_RETRY_AFTER_S]; a malformed huge delay (even "inf") becomes the maximum."""
    if not math.isfinite(seconds) or seconds >= MAX_RETRY_AFTER_S:
        return MAX_RETRY_AFTER_S
    return max(1, math.ceil(seconds))


def _detail_items(details: Any) -> list[dict[str, Any]]:
    err = details.get("error", details) if isinstance(details, dict) else None
    items = err.get("details") if isinstance(err, dict) else None
    return [d for d in items if isinstance(d, dict)] if isinstance(items, list) else []
