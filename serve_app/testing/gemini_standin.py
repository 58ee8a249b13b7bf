"""A stand-in server speaking Gemini's REST protocol, for tests and demos. Never a production default.

Routes (what google-genai 3.x sends):
  POST /{v1beta|v1}/models/{model}:generateContent
  POST /{v1beta|v1}/models/{model}:streamGenerateContent?alt=sse  (events `data: <json>\\n\\n`, only new text
       per event, the last one carries finishReason and usageMetadata; no [DONE])
  GET|POST /_control   read / change the controls (JSON)       GET|DELETE /_requests   the request log

The reply is deterministic (see gemini_standin_model: the words of the last user turn, continuation of a
trailing `model` turn, thinking models). Behaviours can be set for all models (`failure`) or per model
(`model_behaviours`, e.g. {"gone": "not_found", "busy": "429", "old": "reject_continuation",
"thinker": "thinking", "stuck": "hang", "flaky": "cut_stream"}). Requests must carry `x-goog-api-key`
equal to the configured key (missing → 401, wrong → 403, Gemini's error body).
The request log keeps headers without the key's value (only whether it matched).

In tests: `with running_standin(...) as s:` (a background thread on 127.0.0.1, port 0). As a process:
`python -m serve_app.testing.gemini_standin --port N [--latency-ms ..] [--tokens-per-second ..]`, key from
the env var named by --api-key-env (default GEMINI_API_KEY).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from serve_app.testing.gemini_standin_model import (
    Candidate,
    cand,
    ends_with_model_turn,
    error_body,
    reply_candidates,
    sse,
    usage,
)

__all__ = ["BEHAVIOURS", "FAILURES", "Controls", "StandIn", "error_body", "reply_candidates", "running_standin"]

# cut_stream: the stream ends cleanly after `fail_after_events` text events, without a finishReason.
FAILURES = ("none", "400", "429", "500", "503", "mid_stream_error", "hang", "cut_stream")
# Per-model behaviours: any failure, or a model that does not exist, rejects a trailing `model` turn with
# 400 (no continuation / prefill), or thinks `thinking_tokens` out of maxOutputTokens by default.
BEHAVIOURS = (*FAILURES, "not_found", "reject_continuation", "thinking")
_KEY_HEADER = "x-goog-api-key"
_SECRET_HEADERS = {_KEY_HEADER, "authorization"}
DEFAULT_KEY = "standin-test-key"


@dataclass(frozen=True)
class Controls:
    """Runtime behaviour; change with `StandIn.set(...)` or `POST /_control`."""

    latency_ms: float = 0.0  # before the first event (or the whole non-streaming response)
    tokens_per_second: float = 0.0  # stream pacing; 0 = as fast as possible
    failure: str = "none"  # one of FAILURES, for every model without a behaviour of its own
    fail_after_events: int = 1  # mid_stream_error / cut_stream: text events sent before the error / the end
    retry_delay_s: float | str | None = None  # 429: add google.rpc.RetryInfo with this delay (a str: verbatim)
    finish_reason: str | None = None  # override the final finishReason (e.g. "SAFETY")
    thoughts_tokens: int = 0  # report this many thinking tokens in usageMetadata
    known_models: tuple[str, ...] | None = None  # None: any model exists; else others get 404
    model_behaviours: dict[str, str] = field(default_factory=dict)  # model -> one of BEHAVIOURS
    thinking_tokens: int = 48  # what a "thinking" model spends on thoughts unless its budget caps it

    def __post_init__(self) -> None:
        if self.failure not in FAILURES:
            raise ValueError(f"failure must be one of {FAILURES}, not {self.failure!r}")
        bad = {m: b for m, b in self.model_behaviours.items() if b not in BEHAVIOURS}
        if bad:
            raise ValueError(f"model_behaviours values must be among {BEHAVIOURS}, not {bad}")
        if self.thinking_tokens < 0:
            raise ValueError("thinking_tokens must be >= 0")

    def behaviour(self, model: str) -> str:
        """What this model does: its own behaviour, else the global failure."""
        return self.model_behaviours.get(model, self.failure)
        if self.latency_ms < 0 or self.tokens_per_second < 0 or self.fail_after_events < 0:
            raise ValueError("latency_ms, tokens_per_second and fail_after_events must be >= 0")


class StandIn:
    """The server: controls, request log, aiohttp app. Run it with start()/stop() or running_standin()."""

    def __init__(self, api_key: str = DEFAULT_KEY, host: str = "127.0.0.1", port: int = 0, **controls: Any) -> None:
        self.api_key, self.host, self.port = api_key, host, port
        self._controls = Controls(**_normalise(controls))
        self._lock = threading.Lock()
        self._log: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._served = 0

    # ------------------------------------------------------------------------------ Python API
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set(self, **changes: Any) -> Controls:
        """Change controls (thread-safe); unknown names or bad values raise ValueError/TypeError."""
        with self._lock:
            self._controls = dataclasses.replace(self._controls, **_normalise(changes))
            return self._controls

    def controls(self) -> Controls:
        with self._lock:
            return self._controls

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._log]

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    # ------------------------------------------------------------------------------ lifecycle
    async def start_async(self) -> None:
        """Start serving in the running loop; `port` becomes the bound port."""
        app = web.Application()
        app.router.add_post("/{version}/models/{target}", self._generate)
        app.router.add_route("*", "/_control", self._control)
        app.router.add_route("*", "/_requests", self._requests)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=1.0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop_async(self) -> None:
        self._stopping = True  # releases "hang" handlers
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> StandIn:
        """Serve from a background thread with its own event loop (for in-process tests)."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as err:
                failure.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop_async())
            loop.run_until_complete(_cancel_pending())  # handlers still pacing a stream nobody reads any more
            loop.close()

        self._thread = threading.Thread(target=run, name="gemini-standin", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise RuntimeError("the Gemini stand-in failed to start") from failure[0]
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    # ------------------------------------------------------------------------------ handlers
    async def _generate(self, request: web.Request) -> web.StreamResponse:
        version, target = request.match_info["version"], request.match_info["target"]
        model, _, action = target.rpartition(":")
        key = request.headers.get(_KEY_HEADER)
        try:
            body: Any = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        entry = self._record(request, model, action, key, body)
        if key is None:
            return _error(401, "Method doesn't allow unregistered callers (missing API key).")
        if key != self.api_key:
            return _error(403, "API key not valid. Please pass a valid API key.")
        ctl = self.controls()
        behaviour = ctl.behaviour(model)
        if version not in ("v1beta", "v1") or action not in ("generateContent", "streamGenerateContent"):
            return _error(404, f"{request.path} is not a Gemini method")
        if (ctl.known_models is not None and model not in ctl.known_models) or behaviour == "not_found":
            return _error(404, f"models/{model} is not found for API version {version}")
        if not isinstance(body, dict) or not body.get("contents"):
            return _error(400, "* GenerateContentRequest.contents: contents is not specified")
        if behaviour == "reject_continuation" and ends_with_model_turn(body):
            return _error(400, "Please ensure that the last content has the role 'user' (prefill not supported).")
        await asyncio.sleep(ctl.latency_ms / 1000)
        if behaviour == "hang":
            # Polled, not an asyncio.Event: the controls change from other threads (the test's).
            while not self._stopping and self.controls().behaviour(model) == "hang":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            return _error(503, "The stand-in stopped hanging.")
        if behaviour in ("400", "429", "500", "503") or (
            behaviour in ("mid_stream_error", "cut_stream") and action == "generateContent"
        ):
            return _failure(behaviour, ctl)
        self._served += 1
        cands = reply_candidates(body, thinking_tokens=ctl.thinking_tokens if behaviour == "thinking" else 0)
        use = usage(body, cands, ctl.thoughts_tokens)
        if action == "generateContent":
            return web.json_response(self._whole(model, cands, use, ctl))
        return await self._stream(request, entry, model, cands, use, ctl, behaviour)

    def _whole(self, model: str, cands: list[Candidate], use: dict[str, int], ctl: Controls) -> dict[str, Any]:
        out = [cand(i, c.text, ctl.finish_reason or c.finish) for i, c in enumerate(cands)]
        return {"candidates": out, "usageMetadata": use, "modelVersion": model, "responseId": f"standin-{self._served}"}

    async def _stream(
        self,
        request: web.Request,
        entry: dict[str, Any],
        model: str,
        cands: list[Candidate],
        use: dict[str, int],
        ctl: Controls,
        behaviour: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        steps = max(1, max(len(c.pieces) for c in cands))
        try:
            for step in range(steps):
                last = step == steps - 1
                if behaviour == "mid_stream_error" and step >= ctl.fail_after_events:
                    await resp.write(sse(error_body(500, "Stand-in failure in the middle of the stream.")))
                    return resp
                if behaviour == "cut_stream" and step >= ctl.fail_after_events:
                    self._note(entry, "cut")  # noted first: the client may look as soon as the stream ends
                    await resp.write_eof()  # a clean end, but no finishReason: the answer is incomplete
                    return resp
                if step and ctl.tokens_per_second > 0:
                    await asyncio.sleep(1 / ctl.tokens_per_second)
                event_cands = []
                for i, c in enumerate(cands):
                    piece = c.pieces[step] if step < len(c.pieces) else ""
                    if piece or last:
                        event_cands.append(cand(i, piece, (ctl.finish_reason or c.finish) if last else None))
                event: dict[str, Any] = {"candidates": event_cands, "modelVersion": model}
                event["responseId"] = f"standin-{self._served}"
                if last:
                    event["usageMetadata"] = use
                await resp.write(sse(event))
            await resp.write_eof()
            self._note(entry, "complete")
        except (ConnectionResetError, asyncio.CancelledError):
            self._note(entry, "client_gone")  # tests check that abandoned streams are released
        return resp

    async def _control(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                changes = await request.json()
                if not isinstance(changes, dict):
                    raise TypeError("expected a JSON object")
                self.set(**changes)
            except (ValueError, TypeError) as err:
                return web.json_response({"error": str(err)}, status=400)
        return web.json_response(dataclasses.asdict(self.controls()))

    async def _requests(self, request: web.Request) -> web.Response:
        if request.method == "DELETE":
            self.clear_requests()
        return web.json_response({"requests": self.requests()})

    def _record(self, request: web.Request, model: str, action: str, key: str | None, body: Any) -> dict[str, Any]:
        entry = {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "headers": {k: v for k, v in request.headers.items() if k.lower() not in _SECRET_HEADERS},
            "key_present": key is not None,
            "key_matched": key == self.api_key,
            "model": model,
            "action": action,
            "body": body,
        }
        with self._lock:
            self._log.append(entry)
        return entry

    def _note(self, entry: dict[str, Any], outcome: str) -> None:
        with self._lock:
            entry["stream_outcome"] = outcome


async def _cancel_pending() -> None:
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


def _normalise(controls: dict[str, Any]) -> dict[str, Any]:
    if controls.get("known_models") is not None:
        controls = {**controls, "known_models": tuple(controls["known_models"])}
    if controls.get("model_behaviours") is not None:
        controls = {**controls, "model_behaviours": dict(controls["model_behaviours"])}
    return controls


def _error(code: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    return web.json_response(error_body(code, message, details), status=code)


def _failure(failure: str, ctl: Controls) -> web.Response:
    if failure == "429":
        details = None
        if ctl.retry_delay_s is not None:
            delay = ctl.retry_delay_s
            text = delay if isinstance(delay, str) else f"{delay:g}s"  # a str tests malformed upstream values
            details = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": text}]
        return _error(429, "Resource has been exhausted (e.g. check quota).", details)
    if failure == "400":
        return _error(400, "Stand-in rejected the request: * GenerateContentRequest.generation_config: invalid.")
    if failure == "503":
        return _error(503, "The model is overloaded. Please try again later.")
    return _error(500, "An internal error has occurred.")


@contextlib.contextmanager
def running_standin(api_key: str = DEFAULT_KEY, **controls: Any) -> Iterator[StandIn]:
    """A stand-in on 127.0.0.1 with a free port, served from a background thread for the `with` block."""
    standin = StandIn(api_key=api_key, host="127.0.0.1", port=0, **controls).start()
    try:
        yield standin
    finally:
        standin.stop()


async def _serve_forever(standin: StandIn) -> None:
    await standin.start_async()
    print(f"Gemini stand-in listening on {standin.base_url}", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await standin.stop_async()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve_app.testing.gemini_standin", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key-env", default="GEMINI_API_KEY", help="env var holding the key clients must send")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--tokens-per-second", type=float, default=0.0)
    p.add_argument("--failure", choices=FAILURES, default="none")
    args = p.parse_args(argv)
    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"{args.api_key_env} is not set: clients must send the key {DEFAULT_KEY!r}", flush=True)
    standin = StandIn(
        api_key=key or DEFAULT_KEY,
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        tokens_per_second=args.tokens_per_second,
        failure=args.failure,
    )
    asyncio.run(_serve_forever(standin))


if __name__ == "__main__":
    main()
