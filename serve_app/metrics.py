"""Every metric the gateway exports, in one place, with explicit buckets and a small fixed label set.

Metrics go through `ray.util.metrics`, so Ray's metrics agent exports them on the node's metrics port
(8080 on KubeRay pods). Prometheus sees them with a `ray_` prefix, and counters with a `_total` suffix:
`ray_serve_app_requests_total`, `ray_serve_app_ttft_seconds_bucket`, ...

Labels: model (client-facing alias), route (self_hosted | gemini | none), outcome, reason, pool, kind.
Never request ids or client-provided strings (an unknown model name is counted as model="unknown").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.util import metrics as ray_metrics

PREFIX = "serve_app_"

# Client-observed latency buckets (seconds). TTFT spans CPU prefill (~seconds) to GPU (~tens of ms).
TTFT_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]

OUTCOMES = ("ok", "client_error", "server_error", "rejected", "client_abort", "timeout")
SPILL_REASONS = ("saturated", "degraded", "backpressure", "error_before_first_token", "first_token_timeout")


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str
    tags: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus sees (Ray adds `ray_`, counters get `_total`)."""
        return f"ray_{self.name}" + ("_total" if self.kind == "counter" else "")


SPECS: dict[str, MetricSpec] = {
    s.name.removeprefix(PREFIX): s
    for s in (
        MetricSpec(
            PREFIX + "ttft_seconds",
            "histogram",
            "Client-observed time to first token.",
            ("model", "route"),
            tuple(TTFT_BUCKETS),
        ),
        MetricSpec(
            PREFIX + "itl_seconds",
            "histogram",
            "Client-observed gap between streamed tokens.",
            ("model", "route"),
            tuple(ITL_BUCKETS),
        ),
        MetricSpec(
            PREFIX + "request_duration_seconds",
            "histogram",
            "End-to-end request duration.",
            ("model", "route", "outcome"),
            tuple(E2E_BUCKETS),
        ),
        MetricSpec(
            PREFIX + "queue_seconds",
            "histogram",
            "Time from arrival until the chosen backend accepted the request (first reply).",
            ("model", "route"),
            tuple(TTFT_BUCKETS),
        ),
        MetricSpec(
            PREFIX + "requests",
            "counter",
            "Finished requests by route and outcome.",
            ("model", "route", "outcome"),
        ),
        MetricSpec(PREFIX + "tokens", "counter", "Prompt and completion tokens by route.", ("model", "route", "kind")),
        MetricSpec(
            PREFIX + "spill",
            "counter",
            "Requests sent to the hosted model instead of the pool.",
            ("model", "reason"),
        ),
        MetricSpec(
            PREFIX + "inflight_requests",
            "gauge",
            "Requests in flight in this gateway replica.",
            ("model", "route"),
        ),
        MetricSpec(PREFIX + "breaker_state", "gauge", "Circuit breaker: 0 closed, 1 half-open, 2 open.", ("pool",)),
        MetricSpec(PREFIX + "pool_saturated", "gauge", "1 while the gateway considers the pool saturated.", ("pool",)),
        MetricSpec(PREFIX + "pool_replicas", "gauge", "Replicas reporting load for the pool.", ("pool",)),
        MetricSpec(PREFIX + "pool_waiting", "gauge", "Requests waiting in the pool's engine queues.", ("pool",)),
        MetricSpec(PREFIX + "pool_running", "gauge", "Sequences running in the pool's engines.", ("pool",)),
        MetricSpec(
            PREFIX + "pool_kv_cache_usage",
            "gauge",
            "KV-cache usage of the fullest replica (0..1).",
            ("pool",),
        ),
        MetricSpec(PREFIX + "pool_tokens_per_second", "gauge", "Tokens/s the pool generates.", ("pool",)),
        MetricSpec(
            PREFIX + "pool_ready_replicas", "gauge", "Replicas that reported recently and are healthy.", ("pool",)
        ),
        MetricSpec(
            PREFIX + "pool_retries",
            "counter",
            "Pool attempts retried on another replica before the first byte.",
            ("pool", "reason"),
        ),
        MetricSpec(
            PREFIX + "failover",
            "counter",
            "Streams that broke after the first byte, by where they continued (to=none: ended with an error).",
            ("from", "to", "reason"),
        ),
        MetricSpec(
            PREFIX + "failover_stall_seconds",
            "histogram",
            "Client-visible pause while a broken stream is continued elsewhere.",
            ("model",),
            tuple(TTFT_BUCKETS),
        ),
        MetricSpec(PREFIX + "config_rejected", "counter", "Live gateway configs rejected (old one kept).", ()),
        MetricSpec(
            PREFIX + "gemini_model_up", "gauge", "1 when the start-up probe of a Gemini model passed.", ("model",)
        ),
    )
}

# Metrics that exist only once their event happened (a failover, a rejected config, a Gemini probe).
EVENT_ONLY = frozenset({"pool_retries", "failover", "failover_stall_seconds", "config_rejected", "gemini_model_up"})


class Metrics:
    """The gateway's metric objects (one instance per gateway replica process)."""

    def __init__(self) -> None:
        self._m: dict[str, Any] = {}
        for key, spec in SPECS.items():
            if spec.kind == "counter":
                self._m[key] = ray_metrics.Counter(spec.name, spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                self._m[key] = ray_metrics.Gauge(spec.name, spec.description, tag_keys=spec.tags)
            else:
                self._m[key] = ray_metrics.Histogram(
                    spec.name, spec.description, boundaries=list(spec.buckets), tag_keys=spec.tags
                )

    def observe(self, key: str, value: float, **tags: str) -> None:
        self._m[key].observe(value, tags=tags)

    def inc(self, key: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:
            self._m[key].inc(value, tags=tags)

    def set(self, key: str, value: float, **tags: str) -> None:
        self._m[key].set(value, tags=tags)
