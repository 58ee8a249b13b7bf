"""Helpers for the metrics and dashboard tests: the dashboard's PromQL, metric names, Ray's metrics text."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serve_app.metrics import SPECS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_PATH = ROOT / "configs" / "grafana" / "serve_app.json"

# Labels Ray's exporter adds to every series (plus `le` on histogram buckets); the rest are ours.
RAY_LABELS = frozenset(
    {
        "Component",
        "NodeAddress",
        "SessionName",
        "Version",
        "WorkerId",
        "JobId",
        "otel_scope_name",
        "otel_scope_schema_url",
        "otel_scope_version",
        "le",
    }
)

# Metrics the dashboard may use besides ours, each with where it comes from: Ray Serve's controller and
# replicas (name in ray/serve/_private), or vLLM's stat logger through Ray (name in vllm/v1/metrics).
# tests/unit/test_dashboard.py checks every one against the installed, pinned packages' sources.
RAY_SERVE_METRICS = {
    "ray_serve_autoscaling_target_replicas": "serve_autoscaling_target_replicas",
    "ray_serve_deployment_replica_healthy": "serve_deployment_replica_healthy",
    "ray_serve_deployment_queued_queries": "serve_deployment_queued_queries",
}
VLLM_METRICS = {
    "ray_vllm_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "ray_vllm_num_requests_running": "vllm:num_requests_running",
    "ray_vllm_num_requests_waiting": "vllm:num_requests_waiting",
    "ray_vllm_prompt_tokens_total": "vllm:prompt_tokens",
    "ray_vllm_generation_tokens_total": "vllm:generation_tokens",
    "ray_vllm_time_to_first_token_seconds_bucket": "vllm:time_to_first_token_seconds",
    "ray_vllm_inter_token_latency_seconds_bucket": "vllm:inter_token_latency_seconds",
    "ray_vllm_request_queue_time_seconds_bucket": "vllm:request_queue_time_seconds",
    "ray_vllm_e2e_request_latency_seconds_bucket": "vllm:e2e_request_latency_seconds",
}


def series_names(key: str) -> set[str]:
    """The names Prometheus sees for one serve_app.metrics.SPECS entry (histograms: their three series)."""
    spec = SPECS[key]
    if spec.kind == "histogram":
        return {spec.prometheus_name + s for s in ("_bucket", "_count", "_sum")}
    return {spec.prometheus_name}


def our_metric_names() -> set[str]:
    """Every name Prometheus sees for serve_app.metrics.SPECS."""
    return set().union(*(series_names(key) for key in SPECS))


# ------------------------------------------------------------------------------------ the dashboard
@dataclass(frozen=True)
class Target:
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str

    @property
    def label(self) -> str:
        return f"panel {self.panel_id} {self.panel_title!r} target {self.ref_id}"


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD_PATH.read_text())
    return doc


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, including those nested in collapsed rows."""
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def targets(dash: dict[str, Any]) -> list[Target]:
    return [
        Target(p["id"], p["title"], t["refId"], t["expr"])
        for p in panels(dash)
        if p["type"] != "row"
        for t in p.get("targets", [])
    ]


def substitute(expr: str, dash: dict[str, Any], rate_interval: str) -> str:
    """What Grafana sends with every multi-value variable set to All (its allValue) and a concrete window."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    for var in dash["templating"]["list"]:
        if var["type"] == "datasource":
            continue
        out = re.sub(r"\$\{" + var["name"] + r"\}|\$" + var["name"] + r"\b", var["allValue"], out)
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool"})


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (identifiers that are not functions, keywords or labels)."""
    rest = _STRING.sub('""', expr)
    rest = _MATCHERS.sub(" ", rest)
    rest = _RANGES.sub(" ", rest)
    rest = _GROUPING.sub(" ", rest)
    return {m for m in _IDENT.findall(rest) if m not in _KEYWORDS and not m.lower().startswith(("inf", "nan"))}


def is_vllm(expr: str) -> bool:
    return any(name.startswith("ray_vllm_") for name in metric_names(expr))


def has_value(result: list[dict[str, Any]]) -> bool:
    """At least one series with a number (histogram_quantile over zero rates gives NaN)."""
    for series in result:
        value = series.get("value")
        if value is not None and not math.isnan(float(value[1])):
            return True
    return False


# ------------------------------------------------------------------------------------ Ray's metrics text
@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float

    def ours(self) -> dict[str, str]:
        """The labels our code set (Ray's own labels removed)."""
        return {k: v for k, v in self.labels.items() if k not in RAY_LABELS}


def scrape(metrics_port: int) -> list[Sample]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def select(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in select(samples, name, **labels))
