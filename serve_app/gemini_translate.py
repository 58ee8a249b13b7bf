"""OpenAI → Gemini request translation, as pure functions over plain dicts (no SDK import here).

What the Gemini path honours, maps, or refuses (refusals are `BadRequest` with `param`, raised by
`check_supported` before the gateway picks Gemini, so such requests stay self-hosted or get a clear error
instead of being silently degraded):

- messages: system/developer → systemInstruction; user → user; assistant → model; text content and the
  `text` parts of content arrays. Images/audio/files, tool/function messages and assistant tool_calls are
  refused (param `messages`).
- temperature, top_p, top_k (vLLM extra; -1/0 = off), seed, presence/frequency_penalty → generationConfig.
- max_completion_tokens (wins) / max_tokens → maxOutputTokens. stop (str or list, ≤ 5) → stopSequences.
- n → candidateCount (≤ 8); n > 1 is refused on streams (Gemini streams one candidate well; we render one).
- response_format: text → nothing; json_object → responseMimeType application/json; json_schema →
  responseMimeType application/json + responseJsonSchema (the schema as given).
- refused: logprobs/top_logprobs, tools/tool_choice/functions/function_call, logit_bias, audio output,
  vLLM-only sampling/structured-output extras (min_p, repetition_penalty, guided_*, ...); for completions
  also echo, best_of > 1, suffix, logprobs, and prompts that are not one string.
- ignored (no effect on the generated text): user, metadata, store, service_tier, parallel_tool_calls,
  stream_options (only include_usage matters, handled by the adapter), message `name`.

Two settings come from the gateway, not the client (keyword arguments of `build_request`):
- thinking_budget → generationConfig.thinkingConfig.thinkingBudget (None: not sent).
- continue_final_message: continue a partial answer (mid-stream failover). Chat: the messages end with the
  assistant message holding the partial answer, which becomes a trailing `model` turn (no new user turn).
  Completion: `prompt` is `[original_prompt, partial_answer]`, sent as a user turn and a trailing `model` turn.
  Gemini then generates only the text that follows the partial answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.errors import BadRequest

Kind = Literal["chat", "completion"]

MAX_CANDIDATES = 8
MAX_STOP_SEQUENCES = 5

# Parameters Gemini has no equivalent for. A parameter only counts as used when its value differs from
# the "off" values listed here (clients often send explicit defaults such as logprobs=false).
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    # vLLM extras that change the output; Gemini would silently ignore them.
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "length_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "use_beam_search": (None, False),
    "allowed_token_ids": (None, []),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None, []),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "include_stop_str_in_output": (None, False),
}
_UNSUPPORTED_CHAT: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "continue_final_message": (None, False),
}
_UNSUPPORTED_COMPLETION: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


@dataclass(slots=True)
class GeminiRequest:
    """Arguments for `generate_content[_stream]`: SDK-shaped plain dicts (snake_case config keys)."""

    model: str
    contents: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)


def _is_off(value: Any, off_values: tuple[Any, ...]) -> bool:
    # `False == 0` in Python; compare type-aware so `best_of: 1` is off but `echo: 1` is not False.
    return any(value is off or (type(value) is type(off) and value == off) for off in off_values)


def check_supported(body: dict[str, Any], kind: Kind) -> None:
    """Raise BadRequest(param=...) for any request feature the Gemini path cannot honour."""
    table = {**_UNSUPPORTED_COMMON, **(_UNSUPPORTED_CHAT if kind == "chat" else _UNSUPPORTED_COMPLETION)}
    for name, off_values in table.items():
        if name in body and not _is_off(body[name], off_values):
            raise BadRequest(f"'{name}' is not supported by the hosted (Gemini) model", param=name)
    modalities = body.get("modalities")
    if modalities is not None and (not isinstance(modalities, list) or set(modalities) - {"text"}):
        raise BadRequest("only text output is supported by the hosted (Gemini) model", param="modalities")
    n = _int_param(body, "n")
    if n is not None and n > 1 and body.get("stream"):
        raise BadRequest("'n' > 1 is not supported for streamed hosted responses", param="n")
    build_request(body, kind)  # raises on message shapes, formats and values it cannot translate


def build_request(
    body: dict[str, Any], kind: Kind, *, thinking_budget: int | None = None, continue_final_message: bool = False
) -> GeminiRequest:
    """Translate a validated OpenAI request body into a Gemini call. Raises BadRequest on malformed input."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' must be a non-empty string", param="model")
    config: dict[str, Any] = {}
    if kind == "chat":
        system, contents = _contents(body.get("messages"))
        if system:
            config["system_instruction"] = {"parts": [{"text": t} for t in system]}
        if continue_final_message and contents[-1]["role"] != "model":
            raise BadRequest("continuing needs a final assistant message with text", param="messages")
    elif continue_final_message:
        prompt, partial = _continuation_prompt(body.get("prompt"))
        contents = [{"role": "user", "parts": [{"text": prompt}]}, {"role": "model", "parts": [{"text": partial}]}]
    else:
        contents = [{"role": "user", "parts": [{"text": _prompt_text(body.get("prompt"))}]}]
    config.update(_generation_config(body))
    if thinking_budget is not None:
        config["thinking_config"] = {"thinking_budget": thinking_budget}
    return GeminiRequest(model=model, contents=contents, config=config)


def _continuation_prompt(prompt: Any) -> tuple[str, str]:
    if not (isinstance(prompt, list) and len(prompt) == 2 and all(isinstance(p, str) and p for p in prompt)):
        raise BadRequest("continuing a completion needs prompt = [original prompt, partial answer]", param="prompt")
    return prompt[0], prompt[1]


# ----------------------------------------------------------------------------------------- messages
def _contents(messages: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """(system texts, contents). Consecutive turns of one role merge, which Gemini expects."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    system: list[str] = []
    contents: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object", param="messages")
        role = msg.get("role")
        if role in ("tool", "function") or msg.get("tool_calls") or msg.get("function_call"):
            raise BadRequest("tool and function messages are not supported by the hosted model", param="messages")
        texts = _texts(msg.get("content"), i, allow_empty=role == "assistant")
        if role in ("system", "developer"):
            system.extend(t for t in texts if t)
            continue
        if role not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}].role {role!r} is not supported", param="messages")
        parts = [{"text": t} for t in texts if t]
        if not parts:
            continue  # an empty assistant turn carries nothing Gemini could use
        gemini_role = "model" if role == "assistant" else "user"
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    if not contents:
        raise BadRequest("'messages' needs at least one user or assistant message with text", param="messages")
    return system, contents


def _texts(content: Any, index: int, *, allow_empty: bool) -> list[str]:
    if content is None and allow_empty:
        return []
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(
                    f"messages[{index}]: content part {kind!r} is not supported by the hosted model (text only)",
                    param="messages",
                )
            texts.append(part["text"])
        return texts
    raise BadRequest(f"messages[{index}].content must be a string or a list of text parts", param="messages")


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BadRequest("the hosted model takes 'prompt' as one string (or a list of one string)", param="prompt")
    if not prompt:
        raise BadRequest("'prompt' must not be empty", param="prompt")
    return prompt


# ----------------------------------------------------------------------------------------- sampling
def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    for openai_name, gemini_name in (
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
    ):
        value = _float_param(body, openai_name)
        if value is not None:
            cfg[gemini_name] = value
    top_k = _int_param(body, "top_k")
    if top_k is not None and top_k > 0:  # vLLM uses -1 (or 0) for "off"
        cfg["top_k"] = top_k
    seed = _int_param(body, "seed")
    if seed is not None:
        cfg["seed"] = seed
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int_param(body, limit_name)
    if max_tokens is not None:
        if max_tokens < 1:
            raise BadRequest(f"'{limit_name}' must be at least 1", param=limit_name)
        cfg["max_output_tokens"] = max_tokens
    stop = _stop(body.get("stop"))
    if stop:
        cfg["stop_sequences"] = stop
    n = _int_param(body, "n")
    if n is not None and not 1 <= n <= MAX_CANDIDATES:
        raise BadRequest(f"'n' must be between 1 and {MAX_CANDIDATES} on the hosted model", param="n")
    if n is not None and n != 1:
        cfg["candidate_count"] = n
    cfg.update(_response_format(body.get("response_format")))
    return cfg


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("'stop' must be a string or a list of strings", param="stop")
    sequences: list[str] = [s for s in stop if s]
    if len(sequences) > MAX_STOP_SEQUENCES:
        raise BadRequest(f"the hosted model takes at most {MAX_STOP_SEQUENCES} stop sequences", param="stop")
    return sequences


def _response_format(fmt: Any) -> dict[str, Any]:
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_mime_type": "application/json"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be an object", param="response_format")
        return {"response_mime_type": "application/json", "response_json_schema": schema}
    raise BadRequest(f"response_format type {kind!r} is not supported by the hosted model", param="response_format")


def _float_param(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{name}' must be a number", param=name)
    try:
        return float(value)
    except OverflowError:  # an integer beyond any float (hundreds of digits)
        raise BadRequest(f"'{name}' is out of range", param=name) from None


def _int_param(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be an integer", param=name)
    return value
