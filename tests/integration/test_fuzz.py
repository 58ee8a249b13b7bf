"""Fuzzing the gateway's HTTP surface on a real Ray Serve app (issue 11, "Fuzzing").

Thousands of hypothesis-generated requests (tests/fuzz_strategies.py) hit the four OpenAI endpoints plus
/tokenize and /detokenize of one app: a simulated pool (the test double) behind a self_hosted_only route, a
spill route to the Gemini stand-in and a hosted_only route. The cases are drawn first (derandomized: the
same cases every run) and then sent 16 at a time. Properties:
- never a 5xx, except 503 (and 429) with Retry-After: nothing a client controls may produce a 500;
- every non-2xx answer of the app is an OpenAI error object {"error": {"message", "type", "param", "code"}},
  and no 200 stream carries a 5xx error event;
- the server keeps serving: well-formed requests on every route succeed afterwards;
- no gauge drift: /admin/pools ends with open_requests == 0 and every in-flight count 0, breaker closed.
A smaller batch goes to the real vLLM engine (the session's shared `real_app`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serve_app.testing.gemini_standin import StandIn, running_standin
from tests.fuzz_strategies import HOSTED, SIM, SPILL, Case, case_strategy, raw_cases
from tests.integration.conftest import GEMINI_TEST_KEY, GEMINI_TEST_KEY_ENV, TEST_KEYS, TEST_KEYS_ENV, deploy
from tests.support import sim_pool, wait_for

APP = "fuzz"
POOL = "fz"
KEY = TEST_KEYS[0]
SIM_CASES = 2400
REAL_CASES = 100
WORKERS = 16
TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    with running_standin(api_key=GEMINI_TEST_KEY, latency_ms=0, tokens_per_second=0) as s:
        yield s


@pytest.fixture(scope="module")
def root(ray_cluster: dict[str, Any], standin: StandIn) -> Iterator[str]:
    from ray import serve

    config = {
        "pools": {
            POOL: sim_pool(
                simulated={"max_num_seqs": 32, "tokens_per_second": 5000.0, "first_token_delay_s": 0.0},
                deployment={"max_ongoing_requests": 64, "max_queued_requests": 64},
            )
        },
        "routes": {
            SIM: {"policy": "self_hosted_only", "pool": POOL},
            SPILL: {"policy": "spill", "pool": POOL, "gemini_model": "gemini-3.5-flash-lite"},
            HOSTED: {"policy": "hosted_only", "gemini_model": "gemini-3.5-flash-lite"},
        },
        "gemini": {"api_key_env": GEMINI_TEST_KEY_ENV, "base_url": standin.base_url, "timeout_s": 10},
        "gateway": {"num_cpus": 0.1, "api_keys_env": TEST_KEYS_ENV},
    }
    yield deploy(ray_cluster, APP, config).removesuffix("/v1")
    serve.delete(APP)


# ------------------------------------------------------------------------------------------ generation
def draw_cases(strategy: st.SearchStrategy[Case], n: int) -> list[Case]:
    """n cases from hypothesis, the same ones every run (derandomized, no example database)."""
    drawn: list[Case] = []

    @settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(case: Case) -> None:
        drawn.append(case)

    collect()
    return drawn


# ------------------------------------------------------------------------------------------ sending
@dataclass
class Answer:
    case: Case
    status: int | None
    headers: dict[str, str]
    body: bytes
    error: str | None = None


def send(client: httpx.Client, root: str, case: Case) -> Answer:
    headers = list(case.headers)
    if case.auth and not any(k == "authorization" for k, _ in headers):
        headers.append(("authorization", f"Bearer {KEY}".encode()))
    if case.raw is not None or case.framing_only:  # httpx refuses to send these
        return send_raw(root, case, headers)
    try:
        r = client.request(case.method, root + case.path, content=case.body, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        return Answer(case, None, {}, b"", f"{type(err).__name__}: {err}")
    return Answer(case, r.status_code, {k.lower(): v for k, v in r.headers.items()}, r.content)


def send_raw(root: str, case: Case, headers: list[tuple[str, bytes]]) -> Answer:
    """Bytes on a socket, then a half-close: the server must answer (or close), never hang or 5xx.

    `case.raw` (framing cases) replaces the Content-Length this writes for the body.
    """
    host_port, _, prefix = root.removeprefix("http://").partition("/")
    host, port = host_port.split(":")
    head = f"{case.method} /{prefix}{case.path} HTTP/1.1\r\nHost: {host_port}\r\n".encode()
    head += b"".join(k.encode() + b": " + v + b"\r\n" for k, v in headers)
    if case.raw is not None:
        head += case.raw
    elif case.body is not None:
        head += b"Content-Length: %d\r\n" % len(case.body)
    data = b""
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        try:
            sock.sendall(head + b"\r\n" + (case.body or b""))
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError as err:
            return Answer(case, None, {}, b"", f"hung: {err}")
        except OSError:  # the server answered and closed while we were still sending: read what came
            with contextlib.suppress(OSError):
                data += sock.recv(65536)
    if not data:
        return Answer(case, 0, {}, b"")  # closed without an answer: acceptable for broken framing
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    heads = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(case, int(lines[0].split()[1]), heads, body)


def problems(a: Answer) -> list[str]:
    """What is wrong with one answer (empty: fine)."""
    if a.status is None:
        return [f"no answer: {a.error}"]
    out = []
    if a.status >= 500 and a.status != 503:
        out.append(f"HTTP {a.status}")
    if a.status in (429, 503) and "retry-after" not in a.headers:
        out.append(f"HTTP {a.status} without Retry-After")
    if a.status >= 400 and not a.case.framing_only and a.case.method != "HEAD":
        out.extend(error_shape(a.body))
    if a.status == 200 and a.headers.get("content-type", "").startswith("text/event-stream"):
        out.extend(stream_problems(a.body))
    return out


def error_shape(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
        err = doc["error"]
        assert isinstance(err, dict) and isinstance(err["message"], str) and isinstance(err["type"], str)
        assert "param" in err and "code" in err
    except Exception:
        return [f"not an OpenAI error object: {body[:200]!r}"]
    return []


def stream_problems(body: bytes) -> list[str]:
    out = []
    for line in body.decode("utf-8", "replace").splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line.removeprefix("data: "))
        code = event.get("error", {}).get("code") if isinstance(event.get("error"), dict) else None
        if isinstance(code, int) and code >= 500 and code != 503:
            out.append(f"error event {code} in a 200 stream: {line[:200]}")
    return out


def run_cases(root: str, cases: list[Case]) -> tuple[list[Answer], list[str]]:
    limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
    with (
        httpx.Client(timeout=TIMEOUT_S, limits=limits) as client,
        concurrent.futures.ThreadPoolExecutor(WORKERS) as pool,
    ):
        answers = list(pool.map(lambda c: send(client, root, c), cases))
    found = [f"{', '.join(p)} <- {a.case.describe()}" for a in answers if (p := problems(a))]
    return answers, found


# ------------------------------------------------------------------------------------------ the state after
def admin(root: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{root}/admin/pools", headers={"authorization": f"Bearer {KEY}"}).json()
    return doc


def settled(root: str) -> dict[str, Any] | None:
    doc = admin(root)
    return doc if doc["open_requests"] == 0 and not any(doc["inflight"].values()) else None


def assert_still_serving(root: str, aliases: tuple[str, ...]) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=TIMEOUT_S, headers=auth) as c:
        for alias in aliases:
            for stream in (False, True):
                chat = {"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
                r = c.post(f"{root}/v1/chat/completions", json={**chat, "stream": stream})
                assert r.status_code == 200 and b'"error"' not in r.content, (alias, stream, r.text[:300])
            r = c.post(f"{root}/v1/completions", json={"model": alias, "prompt": "hi", "max_tokens": 3})
            assert r.status_code == 200, (alias, r.text[:300])
            assert c.get(f"{root}/v1/models/{alias}").json()["id"] == alias
        assert c.get(f"{root}/v1/models").status_code == 200


def summary(answers: list[Answer], seconds: float) -> str:
    statuses = Counter(a.status for a in answers)
    return f"{len(answers)} cases in {seconds:.1f} s; statuses {dict(sorted(statuses.items(), key=str))}"


# ------------------------------------------------------------------------------------------ the tests
def test_fuzz_simulated_pool_spill_and_hosted_routes(root: str) -> None:
    started = time.monotonic()
    cases = draw_cases(case_strategy(), SIM_CASES) + raw_cases()
    drawn = time.monotonic()
    answers, found = run_cases(root, cases)
    took = time.monotonic() - drawn
    print(f"fuzz: drew {len(cases)} cases in {drawn - started:.1f} s; {summary(answers, took)}")
    print("\n".join(found[:25]))
    # The state after the run first (a failed case must not hide drift), then every case's answer.
    assert_still_serving(root, (SIM, SPILL, HOSTED))
    doc = wait_for(lambda: settled(root), 20, what="open_requests 0 and no in-flight request")
    assert doc["pools"][POOL]["breaker"] == "closed", doc["pools"][POOL]  # client mistakes never open it
    assert len(answers) >= 2000
    statuses = Counter(a.status for a in answers)
    assert statuses[200] >= 100 and statuses[400] >= 500  # the fuzz reaches the engines and the checks
    # KNOWN FAILURE, for the lead (serve_app/gemini_translate.py `_float_param`, not a gateway check): a number
    # too large for a float (top_p / temperature / penalties = 10**400) on a spill or hosted_only route is an
    # OverflowError -> 500 while the gateway checks whether Gemini could take the request.
    assert not found, f"{len(found)} of {len(answers)} cases failed:\n" + "\n".join(found[:25])


# Ray 2.60's HTTP proxy reads these request headers itself, before the app: it decodes them with
# bytes.decode() (ray/serve/_private/proxy.py, setup_request_context_and_handle; http_util.py,
# parse_request_timeout_header / parse_disconnect_disabled_header), so a non-UTF-8 value is a plain-text
# "Internal Server Error" 500 that no app code sees; x-request-timeout-seconds lets a client pick the proxy's
# timeout (a plain-text 408, or none at all with 0). KNOWN FAILURE, for the lead (outside the gateway's
# request checks): until the proxy layer rejects or strips these headers, this test fails.
PROXY_CASES = [
    *[(name, b"\xe9\xff") for name in ("x-request-id", "x-session-id", "serve_multiplexed_model_id")],
    ("x-request-timeout-seconds", b"\xff"),
    ("x-request-disconnect-disabled", b"\xff"),
    ("x-request-timeout-seconds", b"1e-9"),
]


@pytest.mark.parametrize(("name", "value"), PROXY_CASES)
def test_ray_proxy_headers_are_client_errors(root: str, name: str, value: bytes) -> None:
    body = json.dumps({"model": SIM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    case = Case("POST", "/v1/chat/completions", body, (("content-type", b"application/json"), (name, value)))
    with httpx.Client(timeout=TIMEOUT_S) as client:
        answer = send(client, root, case)
    assert not problems(answer), (problems(answer), answer.status, answer.body[:200])


@pytest.mark.real_engine
def test_fuzz_real_engine_batch(real_app: str) -> None:
    """~100 hostile cases against the real vLLM engine (max_tokens stays 4 so that each case is quick)."""
    root = real_app.removesuffix("/v1")
    started = time.monotonic()
    cases = draw_cases(case_strategy(("smollm2",), fixed=("max_tokens", "max_completion_tokens")), REAL_CASES)
    answers, found = run_cases(root, cases)
    print(f"fuzz (real engine): {summary(answers, time.monotonic() - started)}")
    assert not found, f"{len(found)} of {len(answers)} cases failed:\n" + "\n".join(found[:25])
    assert Counter(a.status for a in answers)[200] >= 5  # some cases reached the engine and were answered
    assert_still_serving(root, ("smollm2",))
    doc = wait_for(lambda: settled(root), 30, what="open_requests 0 and no in-flight request")
    assert doc["pools"]["smollm2"]["breaker"] == "closed", doc["pools"]["smollm2"]
