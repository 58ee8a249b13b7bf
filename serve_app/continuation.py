"""Continuing a broken stream: what was sent, whether it may be continued, and the continuation request.

Pure functions over plain data (no I/O). The relay keeps the SSE text it sent; only when a stream breaks
is that text parsed here, so the normal path pays nothing per chunk beyond a list append.

A continuation asks the engine for the rest of the same answer: the original request plus the partial
answer as a final assistant turn that the model continues (vLLM chat: `continue_final_message: true`,
`add_generation_prompt: false`; completions: the prompt with the partial text appended), with the token
budget reduced by what was already produced. Requests whose continuation could not be faithful are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_CREATED = re.compile(r'"created":\s*\d+')


@dataclass(frozen=True)
class Partial:
    """What the client has received of one stream."""

    id: str | None
    created: int | None
    text: str
    finished: bool  # a finish_reason was already sent (nothing left to continue)


def refusal(body: dict[str, Any], kind: str) -> str | None:
    """Why this request cannot be continued faithfully after a failure (None: it can)."""
    n = body.get("n")
    if isinstance(n, int) and n > 1:
        return "n>1"
    best_of = body.get("best_of")
    if isinstance(best_of, int) and best_of > 1:
        return "best_of>1"
    if body.get("tools") and body.get("tool_choice") != "none":
        return "tools"
    if body.get("functions"):
        return "tools"
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object", "structural_tag"):
        return "response_format"
    if any(
        body.get(k) for k in ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
    ):
        return "guided_decoding"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("prompt_logprobs"):
        return "logprobs"
    if kind == "completion":
        if body.get("echo") or body.get("suffix"):
            return "echo"
        prompt = body.get("prompt")
        if isinstance(prompt, list) and not (len(prompt) == 1 and isinstance(prompt[0], str)):
            return "prompt_not_text"
    if kind == "chat":
        messages = body.get("messages")
        if body.get("continue_final_message") or not isinstance(messages, list):
            return "continue_final_message"
    return None


def replay(sent: list[str]) -> Partial:
    """Rebuild the partial answer from the SSE text sent so far (chat deltas or completion text)."""
    parts: list[str] = []
    ident: str | None = None
    created: int | None = None
    finished = False
    for data in sent:
        for event in data.split("\n\n"):
            line = event.strip()
            if not line.startswith("data:"):
                continue
            try:
                payload = json.loads(line[5:])
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            ident = ident or payload.get("id")
            created = created or payload.get("created")
            for choice in payload.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    parts.append(text)
                if choice.get("finish_reason") is not None:
                    finished = True
    return Partial(ident, created if isinstance(created, int) else None, "".join(parts), finished)


def remaining_tokens(body: dict[str, Any], produced: int) -> int | None:
    """The token budget left for the rest of the answer (None: the request set none)."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value - produced
    return None


def continuation_body(body: dict[str, Any], kind: str, partial: Partial, produced: int) -> dict[str, Any] | None:
    """The request that produces the rest of the answer (None: nothing is left to produce)."""
    left = remaining_tokens(body, produced)
    if partial.finished or (left is not None and left <= 0):
        return None
    out = dict(body)
    for key in ("max_completion_tokens", "max_tokens"):
        if key in out and left is not None:
            out[key] = left
    out["stream"] = True
    out["stream_options"] = {"include_usage": True}
    if kind == "chat":
        out["messages"] = [*body["messages"], {"role": "assistant", "content": partial.text}]
        out["add_generation_prompt"] = False
        out["continue_final_message"] = True
    else:
        prompt = body.get("prompt")
        text = prompt[0] if isinstance(prompt, list) else prompt
        out["prompt"] = f"{text}{partial.text}"
    return out


def rewriter(original: Partial, new_id: str | None, new_created: int | None) -> Any:
    """A function that makes a continuation's chunks carry the original stream's id and created time."""

    def rewrite(data: str) -> str:
        if new_id and original.id and new_id != original.id:
            data = data.replace(f'"{new_id}"', f'"{original.id}"')
        if original.created is not None and new_created is not None and new_created != original.created:
            data = _CREATED.sub(f'"created":{original.created}', data)
        return data

    return rewrite


def first_ids(data: str) -> tuple[str | None, int | None]:
    """The id and created time of the first event in a chunk's SSE text."""
    p = replay([data])
    return p.id, p.created


def merged_usage(usage: dict[str, Any], produced_before: int) -> dict[str, Any]:
    """Usage for the whole answer from a continuation's usage: its prompt held the partial answer."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    whole_prompt = max(0, prompt - produced_before)
    whole_completion = completion + produced_before
    return {
        **usage,
        "prompt_tokens": whole_prompt,
        "completion_tokens": whole_completion,
        "total_tokens": whole_prompt + whole_completion,
    }


def with_usage(data: str, usage: dict[str, Any]) -> str:
    """Replace the usage of the usage event(s) in a chunk's SSE text."""
    out: list[str] = []
    for event in data.split("\n\n"):
        line = event.strip()
        if not line:
            continue
        if line.startswith("data:"):
            try:
                payload = json.loads(line[5:])
            except ValueError:
                payload = None
            if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
                payload["usage"] = usage
                line = "data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        out.append(line)
    return "".join(f"{e}\n\n" for e in out)
