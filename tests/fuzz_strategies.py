"""Hypothesis strategies for fuzzing the gateway's HTTP surface (tests/integration/test_fuzz.py).

A `Case` is one HTTP request: valid-shaped OpenAI bodies with hostile values (huge/negative/float/bool/null
numbers, wrong types for every field, lone surrogates, very long strings, unknown fields, deep nesting,
stream/stream_options variants), raw bytes (non-JSON, invalid UTF-8, empty, duplicate keys, 10,000 levels
of nesting), hostile headers (content-type, authorization, x-request-id, Content-Length), and GETs of the
model endpoints with hostile ids and queries. `raw=True` cases are sent as bytes on a socket because no
HTTP client sends a lying Content-Length.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

SIM, SPILL, HOSTED = "sim", "spilly", "gem"  # the app's aliases: self_hosted_only, spill, hosted_only
ALIASES = (SIM, SPILL, HOSTED)
MAX_BODY = 1_048_576  # the gateway's default max_body_bytes
SURROGATES = ("\ud800", "\udfff", "a\udc80b", "\ud83d", "x\ud800\udc00\ud800")
DEEP = 10_000


@dataclass(frozen=True)
class Case:
    method: str
    path: str  # below the app prefix, e.g. /v1/chat/completions
    body: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    label: str = ""
    raw: bytes | None = None  # a whole HTTP request head (raw socket); body follows it
    auth: bool = True  # send the valid API key (unless headers carry an Authorization of their own)
    protocol: bool = False  # malformed HTTP framing: the proxy may answer before the app (no JSON body)
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def framing_only(self) -> bool:
        """The HTTP server itself rejects this request (broken framing, a control byte in a header value):
        its answer is the server's, not the app's, so only "no 5xx" applies."""
        return self.protocol or any((b < 0x20 and b != 0x09) or b == 0x7F for _, v in self.headers for b in v)

    def describe(self, limit: int = 400) -> str:
        body = self.raw + (self.body or b"") if self.raw is not None else self.body
        heads = [(k, _cut(v, 80)) for k, v in self.headers]
        return f"[{self.label}] {self.method} {self.path[:limit]} headers={heads!r} body={_cut(body, limit)!r}"


def _cut(data: bytes | None, limit: int) -> bytes | None:
    return data if data is None or len(data) <= limit else data[:limit] + b"...(%d bytes)" % len(data)


# ------------------------------------------------------------------------------------------ values
def _deep(depth: int, kind: str) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


huge_ints = st.sampled_from([0, -1, 2**31, -(2**31), 2**63, 2**64 + 1, 10**30, -(10**30), 10**400])
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, -0.0, 1e308, 5e-324, 1.0]),
)
surrogate_text = st.builds(
    lambda a, s, b: a + s + b, st.text(max_size=5), st.sampled_from(SURROGATES), st.text(max_size=5)
)
long_text = st.sampled_from([100_000, 400_000]).map(lambda n: "word " * (n // 5))
# A long text in about one of 40 draws (hypothesis favours small integers, hence 29, not 0): enough of them
# to matter, few enough that a run stays fast.
rarely_long = st.integers(0, 39).flatmap(lambda i: long_text if i == 29 else st.text(max_size=40))
texts = st.one_of(
    st.text(max_size=40), surrogate_text, rarely_long, st.sampled_from(["", " ", "\x00", "\u202e", "🦜" * 50])
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
nested = st.sampled_from([50, 500, 900, 950, 990, 1200]).flatmap(
    lambda d: st.sampled_from(["list", "dict"]).map(lambda k: _deep(d, k))
)
junk: st.SearchStrategy[Any] = st.one_of(
    scalars,
    nested,
    st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=8
    ),
)

# ------------------------------------------------------------------------------------------ bodies
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": st.sampled_from(["hi", "tell me a story"])}
)
hostile_message = st.one_of(
    junk,
    st.fixed_dictionaries({"role": junk, "content": junk}),
    st.fixed_dictionaries({"role": st.just("user"), "content": junk}),
    st.fixed_dictionaries(
        {"role": st.just("user"), "content": st.lists(st.fixed_dictionaries({"type": junk, "text": junk}), max_size=3)}
    ),
    st.fixed_dictionaries({"role": st.just("tool"), "content": texts, "tool_call_id": junk}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": junk, "tool_calls": junk}),
)
stream_options = st.one_of(
    junk, st.fixed_dictionaries({"include_usage": junk}), st.fixed_dictionaries({"continuous_usage_stats": junk})
)
# Every field a client may send, each with its own hostile values (plus plain junk for any of them).
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": st.one_of(st.sampled_from(["nope", ""]), texts, junk),
    "messages": st.one_of(junk, st.lists(hostile_message, max_size=4), st.lists(message, min_size=300, max_size=300)),
    "prompt": st.one_of(
        junk, st.lists(texts, max_size=3), st.lists(st.integers(-5, 2**40), max_size=20), st.lists(st.lists(numbers))
    ),
    "max_tokens": st.one_of(numbers, junk),
    "max_completion_tokens": st.one_of(numbers, junk),
    "temperature": numbers,
    "top_p": numbers,
    "n": st.one_of(numbers, st.sampled_from([0, 2, 128])),
    "stop": st.one_of(texts, st.lists(texts, max_size=5), junk),
    "stream": st.one_of(st.booleans(), junk),
    "stream_options": stream_options,
    "logprobs": st.one_of(st.booleans(), numbers, junk),
    "top_logprobs": numbers,
    "echo": junk,
    "seed": numbers,
    "logit_bias": st.one_of(junk, st.dictionaries(texts, numbers, max_size=3)),
    "presence_penalty": numbers,
    "frequency_penalty": numbers,
    "user": junk,
    "tools": st.one_of(
        junk,
        st.lists(st.fixed_dictionaries({"type": junk, "function": junk}), max_size=2),
        st.lists(
            st.fixed_dictionaries(
                {"type": st.just("function"), "function": st.fixed_dictionaries({"name": texts, "parameters": junk})}
            ),
            max_size=2,
        ),
    ),
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), junk),
    "response_format": st.one_of(
        junk,
        st.fixed_dictionaries(
            {"type": st.sampled_from(["json_object", "json_schema", "text", "x"]), "json_schema": junk}
        ),
    ),
    "continue_final_message": junk,
    "add_generation_prompt": junk,
    "suffix": junk,
    "best_of": numbers,
    "guided_json": junk,
}
UNKNOWN = st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS)


def _base(kind: str, model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 4, "stream": stream}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return body


@st.composite
def openai_body(draw: st.DrawFn, kind: str, aliases: tuple[str, ...], fixed: tuple[str, ...] = ()) -> Any:
    """A valid-shaped body with 1-4 fields set to hostile values (or removed), plus maybe unknown fields.

    `fixed` fields keep their valid value (the real engine keeps max_tokens=4 so a case stays fast).
    """
    body = _base(kind, draw(st.sampled_from(aliases)), draw(st.booleans()))
    skip = {"prompt" if kind == "chat" else "messages", *fixed}
    names = [n for n in FIELDS if n not in skip]
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            body.pop(name, None)
        elif name == "model" and draw(st.booleans()):
            body[name] = draw(st.sampled_from(aliases))
        else:
            body[name] = draw(FIELDS[name])
    body.update(draw(st.dictionaries(UNKNOWN, junk, max_size=2)))
    return body


def encode(obj: Any, how: str) -> bytes:
    """JSON text of obj: ascii escapes (lone surrogates stay `\\ud800` escapes), raw UTF-8 with surrogatepass
    (invalid UTF-8 on the wire), or compact. Values JSON cannot hold (NaN, inf) are written as Python does."""
    if how == "utf8-surrogatepass":
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "compact":
        return json.dumps(obj, separators=(",", ":")).encode()
    return json.dumps(obj).encode()


def _dumps_safe(obj: Any, how: str) -> bytes:
    try:
        return encode(obj, how)
    except (RecursionError, ValueError):  # a drawn value nested too deeply for the encoder: send it as text
        return repr(obj).encode("utf-8", "surrogatepass")


ENCODINGS = st.sampled_from(["ascii", "ascii", "compact", "utf8-surrogatepass"])
CONTENT_TYPES = st.sampled_from(
    [
        b"application/json",
        b"application/json",
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"application/json; charset=latin-1",
        b"\xff\xfe",
        b"",
    ]
)
AUTH = st.sampled_from(
    [
        None,
        None,
        None,
        None,
        b"",
        b"Bearer",
        b"Bearer wrong",
        b"Basic abc",
        b"Bearer \xe9\xff",
        b"bearer sk-test-alpha-123 extra",
        b"Bearer " + b"k" * 8000,
    ]
)


def _one_line(value: bytes) -> bool:
    return b"\r" not in value and b"\n" not in value and b"\x00" not in value


utf8_values = st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")).filter(_one_line)
# Valid UTF-8 only in the headers Ray's HTTP proxy reads itself: a non-UTF-8 value there, and a client-chosen
# proxy timeout, are known Ray 2.60 proxy failures with a test of their own (test_fuzz.py,
# test_ray_proxy_headers_are_client_errors), kept out of the general fuzz so that it tests the app.
REQUEST_IDS = st.one_of(st.none(), utf8_values, st.just(b"r" * 5000), st.just(b"same-id"))
PROXY_HEADERS = ("x-session-id", "serve_multiplexed_model_id", "x-request-disconnect-disabled")


@st.composite
def headers(draw: st.DrawFn) -> tuple[tuple[str, bytes], ...]:
    out = [("content-type", draw(CONTENT_TYPES))]
    auth = draw(AUTH)
    if auth is not None:
        out.append(("authorization", auth))
    rid = draw(REQUEST_IDS)
    if rid is not None:
        out.append(("x-request-id", rid))
    if draw(st.integers(0, 3)) == 1:
        out.append((draw(st.sampled_from(PROXY_HEADERS)), draw(st.one_of(st.sampled_from([b"?1", b""]), utf8_values))))
    if draw(st.booleans()):
        out.append(("accept", draw(st.sampled_from([b"text/event-stream", b"*/*", b"application/xml", b"\x01"]))))
    return tuple((k, v.strip(b" \t")) for k, v in out)  # servers drop leading/trailing blanks anyway


POST_PATHS = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


def _make_raw_bodies() -> st.SearchStrategy[bytes]:
    chat = json.dumps(_base("chat", SIM, False))[1:]
    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from(
            [
                b"",
                b"null",
                b"[]",
                b"{}",
                b"0",
                b'"x"',
                b"true",
                b"{",
                b"}",
                b"\xef\xbb\xbf{}",
                b"\xff\xfe{\x00}\x00",
                b"[" * DEEP + b"]" * DEEP,
                b'{"a":' * DEEP + b"1" + b"}" * DEEP,
                b"[" * DEEP,
                b'{"model": "sim", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                b'{"model": "sim", "model": 1, ' + chat.encode(),
                b'{"model": 1, "model": "sim", ' + chat.encode(),
                b'{"stream": true, "stream": "no", ' + chat.encode(),
                b'{"model": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
                b'{"model": "sim", "messages": [{"role": "user", "content": "x"}], "stop": ["\\ud800"], '
                b'"max_tokens": 2}',
                b'{"model": "sim", "messages": [{"role": "\xed\xa0\x80", "content": "x"}]}',
                b'{"model": "sim", "prompt": "x", "max_tokens": NaN}',
                b'{"model": "sim", "prompt": "x", "max_tokens": 1e999}',
                b'{"model": "sim", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
                b'{"model": "sim", "prompt": "' + b"a" * (MAX_BODY + 10) + b'"}',
                b'{"model": "sim", "prompt": "' + b"a" * (MAX_BODY - 200) + b'", "max_tokens": 1}',
            ]
        ),
        st.builds(lambda b, n: b[:n], st.just(chat.encode()), st.integers(0, len(chat))),  # truncated JSON
    )


RAW_BODIES = _make_raw_bodies()  # built once: some hold 1 MiB or 10,000 levels of nesting


@st.composite
def post_case(draw: st.DrawFn, aliases: tuple[str, ...], fixed: tuple[str, ...] = ()) -> Case:
    kind = draw(st.sampled_from(["chat", "completion"]))
    if draw(st.integers(0, 4)) == 0:
        body, label = draw(RAW_BODIES), f"{kind}/raw"
    else:
        body, label = _dumps_safe(draw(openai_body(kind, aliases, fixed)), draw(ENCODINGS)), f"{kind}/fields"
    return Case("POST", POST_PATHS[kind], body, draw(headers()), label)


@st.composite
def tokenizer_case(draw: st.DrawFn, aliases: tuple[str, ...]) -> Case:
    kind = draw(st.sampled_from(["tokenize", "detokenize"]))
    body: dict[str, Any] = {"model": draw(st.one_of(st.sampled_from(aliases), FIELDS["model"]))}
    if kind == "detokenize":
        body["tokens"] = draw(st.one_of(st.lists(st.integers(-(2**40), 2**40), max_size=10), junk))
    elif draw(st.booleans()):
        body["prompt"] = draw(FIELDS["prompt"])
    else:
        body["messages"] = draw(FIELDS["messages"])
    body.update(draw(st.dictionaries(UNKNOWN, junk, max_size=2)))
    raw = draw(st.one_of(st.just(None), RAW_BODIES))
    content = raw if raw is not None else _dumps_safe(body, draw(ENCODINGS))
    return Case("POST", f"/{kind}", content, draw(headers()), f"{kind}/{'raw' if raw is not None else 'fields'}")


def _quote_id(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")
    return urllib.parse.quote(raw, safe="/")


@st.composite
def get_case(draw: st.DrawFn, aliases: tuple[str, ...]) -> Case:
    known = st.sampled_from([*aliases, "", "nope", "..", "../admin/pools", f"{aliases[0]}/extra"])
    ident = draw(st.one_of(known, texts, st.binary(max_size=30)))
    path = draw(st.sampled_from(["/v1/models", f"/v1/models/{_quote_id(ident)}"]))
    query = draw(st.one_of(st.just(""), st.binary(max_size=40).map(lambda b: "?" + urllib.parse.quote(b, safe="=&"))))
    method = draw(st.sampled_from(["GET", "GET", "GET", "POST", "DELETE", "HEAD"]))
    if len(path) > 30_000:  # longer than HTTP clients send (and than the proxy's request-head limit)
        return Case(method, path, label="models/long-path", raw=b"", protocol=True)
    return Case(method, path + query, None, draw(headers()), f"models/{method}")


@st.composite
def wrong_method_case(draw: st.DrawFn) -> Case:
    path = draw(
        st.sampled_from([*POST_PATHS.values(), "/tokenize", "/detokenize", "/v1/nope", "/v1/chat/completions/x"])
    )
    method = draw(st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "POST"]))
    return Case(method, path, b"{}", draw(headers()), f"path/{method}")


def raw_cases() -> list[Case]:
    """Framing a client controls that no HTTP library sends: lying or absurd Content-Length, bad chunking.

    `raw` holds the header lines the sender puts after its own (request line, Host, Content-Type, auth).
    """
    body = json.dumps(_base("chat", SIM, False)).encode()
    path = "/v1/chat/completions"
    lengths = [b"99999999999999999999999", str(MAX_BODY + 1).encode(), b"-1", b"abc", b"1, 2", b"0", b" 5"]
    cases = [
        Case("POST", path, body, label=f"raw/content-length={n.decode()}", raw=_line(b"Content-Length", n))
        for n in lengths
    ]
    short = _line(b"Content-Length", b"%d" % len(body))
    cases.append(Case("POST", path, body[:10], label="raw/short-body", raw=short))
    chunked = _line(b"Transfer-Encoding", b"chunked")
    for chunks in (b"zz\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffff\r\nab", b"5\r\n{}\r\n0\r\n\r\n"):
        cases.append(Case("POST", path, chunks, label="raw/chunked", raw=chunked))
    cases.append(Case("POST", path, body, label="raw/both", raw=chunked + _line(b"Content-Length", b"3")))
    return [
        Case(c.method, c.path, c.body, (("content-type", b"application/json"),), c.label, c.raw, protocol=True)
        for c in cases
    ]


def _line(name: bytes, value: bytes) -> bytes:
    return name + b": " + value + b"\r\n"


def case_strategy(aliases: tuple[str, ...] = ALIASES, fixed: tuple[str, ...] = ()) -> st.SearchStrategy[Case]:
    """Every kind of case, weighted towards the two POST endpoints."""
    post = post_case(aliases, fixed)
    return st.one_of(post, post, post, post, tokenizer_case(aliases), get_case(aliases), wrong_method_case())
