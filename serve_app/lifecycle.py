"""One request's record and the one place it ends: exactly one outcome, one log line, one set of metrics.

Every exit path of the gateway (ok, client abort, client error, upstream error, timeout, cancellation)
calls `Ledger.finish(rec)`; a second call is a no-op, so a path that finishes early and a `finally`
that finishes again can never count a request twice. The in-flight gauge follows `rec.route` and is
given back in `finish`, so it cannot drift whatever way a request ends.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve_app.metrics import Metrics

request_log = logging.getLogger("serve_app.requests")

# Outcomes (the `outcome` label of serve_app_requests_total and the log line).
OK, CLIENT_ABORT, CLIENT_ERROR, REJECTED, UPSTREAM_ERROR, TIMEOUT = (
    "ok",
    "client_abort",
    "client_error",
    "rejected",
    "server_error",
    "timeout",
)


def outcome_for_status(status: int) -> str:
    if status < 400:
        return OK
    if status == 499:
        return CLIENT_ABORT
    if status in (429, 503):
        return REJECTED
    if status == 504:
        return TIMEOUT
    return CLIENT_ERROR if status < 500 else UPSTREAM_ERROR


@dataclass
class RequestRecord:
    """What the per-request log line and the metrics say about one request."""

    request_id: str
    alias: str
    kind: str
    stream: bool
    started: float = field(default_factory=time.monotonic)
    route: str = "none"
    upstream_model: str = ""
    spill_reason: str = ""
    outcome: str = OK
    status: int = 200
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0  # pool attempts retried before the first byte
    failovers: list[str] = field(default_factory=list)  # "from->to:reason" per mid-stream continuation
    spill_inputs: dict[str, Any] | None = None  # what the spill decision saw (explainability)
    id_header: bool = True  # send x-request-id ourselves (False when Ray's proxy already adds it)
    # The engine request id: the request id plus a unique tail, so two clients sending the same
    # X-Request-Id can never abort or mix each other's engine requests.
    engine_id: str = ""
    finished: bool = False

    def __post_init__(self) -> None:
        if not self.engine_id:
            self.engine_id = f"{self.request_id}-{uuid.uuid4().hex[:8]}"

    def fail(self, status: int, outcome: str | None = None) -> None:
        self.status, self.outcome = status, outcome or outcome_for_status(status)

    def log_fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "engine_id": self.engine_id if self.route == "self_hosted" else None,
            "model": self.alias,
            "kind": self.kind,
            "stream": self.stream,
            "route": self.route,
            "spill_reason": self.spill_reason or None,
            "spill_inputs": self.spill_inputs,
            "status": self.status,
            "outcome": self.outcome,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 1),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "retries": self.retries,
            "failovers": self.failovers or None,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 1),
        }


class Ledger:
    """Opens and finishes requests; owns the in-flight gauge and the per-request metrics and log line."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._inflight: dict[tuple[str, str], int] = {}
        self.open = 0  # requests started and not finished (all routes; for tests and /admin)

    def start(self, rec: RequestRecord) -> RequestRecord:
        self.open += 1
        return rec

    def set_route(self, rec: RequestRecord, route: str) -> None:
        """Move the request's in-flight count to `route` (a spill moves it from self_hosted to gemini)."""
        self._count(rec, -1)
        rec.route = route
        self._count(rec, +1)

    def _count(self, rec: RequestRecord, delta: int) -> None:
        if rec.route == "none":
            return
        key = (rec.alias, rec.route)
        self._inflight[key] = self._inflight.get(key, 0) + delta
        self.metrics.set("inflight_requests", self._inflight[key], model=rec.alias, route=rec.route)

    def export_inflight(self) -> None:
        for (alias, route), n in self._inflight.items():
            self.metrics.set("inflight_requests", n, model=alias, route=route)

    def inflight(self) -> dict[str, int]:
        return {f"{alias}/{route}": n for (alias, route), n in self._inflight.items()}

    def finish(self, rec: RequestRecord) -> None:
        if rec.finished:
            return
        rec.finished = True
        self.open -= 1
        self._count(rec, -1)
        labels = {"model": rec.alias, "route": rec.route}
        duration = time.monotonic() - rec.started
        self.metrics.inc("requests", model=rec.alias, route=rec.route, outcome=rec.outcome)
        self.metrics.observe("request_duration_seconds", duration, outcome=rec.outcome, **labels)
        self.metrics.inc("tokens", rec.prompt_tokens, kind="prompt", **labels)
        self.metrics.inc("tokens", rec.completion_tokens, kind="completion", **labels)
        request_log.info(json.dumps(rec.log_fields(), separators=(",", ":"), ensure_ascii=True))


def configure_request_log() -> None:
    """Make the per-request line reach the replica's log in every deployment mode, at INFO.

    Inside a Serve replica the `ray.serve` logger owns the replica's log file handlers; the request log
    writes through the same handlers (and does not propagate, so it is written once). Outside Ray it
    writes to stderr.
    """
    if request_log.handlers:
        return
    request_log.setLevel(logging.INFO)
    handlers = logging.getLogger("ray.serve").handlers
    if handlers:
        for handler in handlers:
            request_log.addHandler(handler)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_log.addHandler(handler)
    request_log.propagate = False
