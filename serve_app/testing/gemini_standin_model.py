"""What the Gemini stand-in answers: deterministic replies, usage, error bodies (pure functions, no server).

The reply to a generateContent body is "Gemini stand-in reply: " + the words of the last user turn (candidate
i > 0 says "reply i+1:"), one piece (a word with its leading space) = one token. maxOutputTokens (→
MAX_TOKENS), stopSequences and candidateCount are honoured. Two behaviours of current models are modelled:

- Continuation: when `contents` end with a `model` turn, the reply continues that turn: if the full reply
  starts with the model turn's text, only the rest comes back (so partial + continuation == the full reply,
  character for character); otherwise the full reply does.
- Thinking: a thinking model (`thinking_tokens` > 0) spends that many tokens on thoughts out of
  maxOutputTokens before it answers, unless `generationConfig.thinkingConfig.thinkingBudget` caps it (0: no
  thinking). With maxOutputTokens 32 and 48 thinking tokens the answer is empty and ends on MAX_TOKENS.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
          429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip
_PIECE = re.compile(r"\s*\S+")


def error_body(code: int, message: str, details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "status": STATUS.get(code, "UNKNOWN")}
    if details:
        err["details"] = details
    return {"error": err}


@dataclass
class Candidate:
    pieces: list[str]  # one token each, with its leading whitespace ("Gemini", " stand-in", ...)
    finish: str
    thoughts: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def texts(content: Any) -> list[str]:
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p["text"] for p in parts or [] if isinstance(p, dict) and isinstance(p.get("text"), str)]


def ends_with_model_turn(body: dict[str, Any]) -> bool:
    contents = body.get("contents") or []
    return bool(contents) and isinstance(contents[-1], dict) and contents[-1].get("role") == "model"


def prompt_tokens(body: dict[str, Any]) -> int:
    found = texts(body.get("systemInstruction"))
    for content in body.get("contents") or []:
        found += texts(content)
    return sum(len(t.split()) for t in found)


def thinking_spend(body: dict[str, Any], thinking_tokens: int) -> int:
    """Thinking tokens a model that thinks `thinking_tokens` by default spends on this request."""
    config = (body.get("generationConfig") or {}).get("thinkingConfig") or {}
    # Gemini accepts both spellings (proto3 JSON); google-genai 3.6 sends the snake_case one.
    thinking = config.get("thinkingBudget", config.get("thinking_budget"))
    if not isinstance(thinking, int) or thinking < 0:
        return thinking_tokens  # no budget, or -1 (dynamic): the model's default
    return min(thinking, thinking_tokens)


def reply_candidates(body: dict[str, Any], *, thinking_tokens: int = 0) -> list[Candidate]:
    """The deterministic reply for a generateContent body, one entry per candidate."""
    contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
    user_turns = [c for c in contents if c.get("role", "user") == "user"]
    prompt_words = " ".join(texts(user_turns[-1])).split() if user_turns else []
    partial = "".join(texts(contents[-1])) if ends_with_model_turn(body) else ""
    cfg = body.get("generationConfig") or {}
    max_tokens = cfg.get("maxOutputTokens")
    thoughts = thinking_spend(body, thinking_tokens)
    stops = [s for s in cfg.get("stopSequences") or [] if s]
    out = []
    for i in range(int(cfg.get("candidateCount") or 1)):
        label = "reply:" if i == 0 else f"reply {i + 1}:"
        full = " ".join(["Gemini", "stand-in", label, *prompt_words])
        cut = min((idx for idx in (full.find(s) for s in stops) if idx >= 0), default=-1)
        full = full[:cut] if cut >= 0 else full
        rest = full[len(partial) :] if partial and full.startswith(partial) else full
        pieces = _PIECE.findall(rest)
        finish = "STOP"
        if isinstance(max_tokens, int):
            room = max(0, max_tokens - thoughts)
            thoughts = min(thoughts, max_tokens)
            if len(pieces) > room:
                pieces, finish = pieces[:room], "MAX_TOKENS"
        out.append(Candidate(pieces, finish, thoughts))
    return out


def usage(body: dict[str, Any], cands: list[Candidate], extra_thoughts: int = 0) -> dict[str, int]:
    """usageMetadata; `extra_thoughts` adds reported-only thinking tokens (the `thoughts_tokens` control)."""
    prompt, generated = prompt_tokens(body), sum(len(c.pieces) for c in cands)
    thoughts = sum(c.thoughts for c in cands) + extra_thoughts
    out = {"promptTokenCount": prompt, "candidatesTokenCount": generated}
    if thoughts:
        out["thoughtsTokenCount"] = thoughts
    out["totalTokenCount"] = prompt + generated + thoughts
    return out


def cand(index: int, text: str, finish: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]}, "index": index}
    if finish is not None:
        out["finishReason"] = finish
    return out


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
