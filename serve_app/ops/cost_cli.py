"""`serve-app cost`: self-hosted vs Gemini cost from Prometheus (HTTP API) or a metrics text snapshot."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from serve_app.ops.cost import (
    REPLICAS_METRIC,
    REQUESTS_METRIC,
    ROUTE_SELF_HOSTED,
    TOKENS_METRIC,
    CostError,
    CostInputs,
    CostReport,
    Sample,
    compute_report,
    daily_cost_curves,
    gpu_hourly_usd,
    hosted_price,
    load_price_table,
    pool_replicas,
    request_counts,
    token_usage,
)

log = logging.getLogger(__name__)
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or answered with an error (exit 1: not the user's input)."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cost",
        help="self-hosted vs Gemini cost per 1M tokens, break-even volume, recommendation",
        description="Cost report from the app's token counters. See docs/capacity-and-cost.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prometheus", metavar="URL", help="Prometheus base URL (HTTP API /api/v1/query)")
    src.add_argument("--metrics-file", metavar="FILE", help="Prometheus text snapshot (counters since start)")
    p.add_argument("--window", help="time covered: query range (default 1h) or the snapshot's uptime (required)")
    p.add_argument("--gpu", default="L4", help="GPU type for the price table (default %(default)s)")
    p.add_argument("--gpu-hourly-usd", type=float, help="override $/hour per GPU")
    p.add_argument("--replicas", type=float, help="self-hosted replicas (default: the pool replicas gauge)")
    p.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs per replica (tensor parallel size)")
    p.add_argument("--gemini-model", default="gemini-3.5-flash-lite", help="hosted price to compare with")
    p.add_argument("--price-file", help="Gemini price table JSON (shape of serve_app/data/gemini_prices.json)")
    p.add_argument("--fixed-monthly-usd", type=float, default=0.0, help="on-call, engineering time, ... per month")
    p.add_argument("--capacity-tokens-per-second", type=float, help="per-replica throughput (prompt+completion)")
    p.add_argument("--target-utilization", type=float, default=0.8, help="usable share of a given capacity")
    p.add_argument("--timeout", type=float, default=10.0, help="Prometheus request timeout (s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--chart", metavar="PNG", help="write cost/day vs tokens/day for both options")
    p.set_defaults(func=run)


def parse_window(text: str) -> float:
    """Seconds in a Prometheus duration such as 1h, 30m, 1h30m, 7d."""
    if not text or _DURATION.sub("", text) != "":
        raise CostError(f"invalid window {text!r} (use a Prometheus duration such as 1h, 30m, 1d)")
    seconds = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(text))
    if seconds <= 0:
        raise CostError(f"window must be positive (got {text!r})")
    return float(seconds)


def query(base_url: str, promql: str, timeout: float) -> list[dict[str, Any]]:
    """One instant query; returns the vector result (list of {metric, value})."""
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:200]
        raise PrometheusError(f"Prometheus answered {err.code} for {promql!r}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise PrometheusError(f"cannot reach Prometheus at {base_url}: {err}") from None
    except json.JSONDecodeError:
        raise PrometheusError(f"Prometheus at {base_url} did not answer JSON") from None
    if body.get("status") != "success":
        raise PrometheusError(f"Prometheus query failed: {body.get('error', body)}")
    result: list[dict[str, Any]] = body.get("data", {}).get("result", [])
    return result


def _samples(name: str, result: list[dict[str, Any]]) -> list[Sample]:
    return [Sample(name, r.get("metric", {}), float(r["value"][1])) for r in result]


def _scalar(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if result else None


def from_prometheus(url: str, window: str, timeout: float) -> dict[str, Any]:
    """Token/request increases over the window, average and max replicas, peak token rates."""
    w = window
    tok = _samples(TOKENS_METRIC, query(url, f"sum by (model, route, kind) (increase({TOKENS_METRIC}[{w}]))", timeout))
    req = _samples(
        REQUESTS_METRIC, query(url, f"sum by (model, route, outcome) (increase({REQUESTS_METRIC}[{w}]))", timeout)
    )
    avg_replicas = _scalar(query(url, f"sum(max by (pool) (avg_over_time({REPLICAS_METRIC}[{w}])))", timeout))
    max_replicas = _scalar(query(url, f"sum(max by (pool) (max_over_time({REPLICAS_METRIC}[{w}])))", timeout))
    own = f'{TOKENS_METRIC}{{route="{ROUTE_SELF_HOSTED}"}}'
    peak_own = _scalar(query(url, f"max_over_time(sum(rate({own}[5m]))[{w}:1m])", timeout))
    peak_all = _scalar(query(url, f"max_over_time(sum(rate({TOKENS_METRIC}[5m]))[{w}:1m])", timeout))
    return {
        "tokens": tok,
        "requests": req,
        "replicas": avg_replicas,
        "max_replicas": max_replicas,
        "peak_self_hosted_tps": peak_own,
        "peak_tps": peak_all,
    }


def from_metrics_file(path: str) -> dict[str, Any]:
    from serve_app.ops.promtext import parse_samples

    try:
        with open(path, encoding="utf-8") as f:
            samples = parse_samples(f.read())
    except OSError as err:
        raise CostError(f"{path}: cannot read: {err.strerror}") from None
    except ValueError as err:
        raise CostError(f"{path}: not Prometheus text format: {err}") from None
    return {
        "tokens": samples,
        "requests": samples,
        "replicas": pool_replicas(samples),
        "max_replicas": None,
        "peak_self_hosted_tps": None,
        "peak_tps": None,
    }


def build_inputs(args: argparse.Namespace, data: dict[str, Any], window_s: float) -> CostInputs:
    tokens = token_usage(data["tokens"])
    replicas = args.replicas if args.replicas is not None else data["replicas"]
    if replicas is None:
        raise CostError(f"no {REPLICAS_METRIC} gauge in the metrics: pass --replicas")
    gpu, hourly = gpu_hourly_usd(args.gpu, args.gpu_hourly_usd)
    capacity, source = args.capacity_tokens_per_second, "given"
    if capacity is None and data["peak_self_hosted_tps"] and data["max_replicas"]:
        capacity, source = data["peak_self_hosted_tps"] / data["max_replicas"], "observed peak"
    total = sum(t.total for t in tokens)
    peak_to_mean = data["peak_tps"] / (total / window_s) if data["peak_tps"] and total else None
    return CostInputs(
        window_s=window_s,
        tokens=tokens,
        requests=request_counts(data["requests"]),
        gpu=gpu,
        gpu_hourly_usd=hourly,
        replicas=replicas,
        gpus_per_replica=args.gpus_per_replica,
        hosted=hosted_price(load_price_table(args.price_file), args.gemini_model),
        fixed_monthly_usd=args.fixed_monthly_usd,
        capacity_tokens_per_second=capacity,
        capacity_source=source if capacity is not None else "unknown",
        target_utilization=args.target_utilization,
        peak_to_mean=peak_to_mean,
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.metrics_file and not args.window:
            raise CostError("--window is required with --metrics-file: how long the counters have been counting")
        window = args.window or "1h"
        window_s = parse_window(window)
        data = (
            from_prometheus(args.prometheus, window, args.timeout)
            if args.prometheus
            else from_metrics_file(args.metrics_file)
        )
        report = compute_report(build_inputs(args, data, window_s))
    except CostError as err:
        print(f"serve-app cost: error: {err}", file=sys.stderr)
        return 2
    except PrometheusError as err:
        print(f"serve-app cost: error: {err}", file=sys.stderr)
        return 1
    if args.chart:
        try:
            write_chart(report, args.chart)
        except OSError as err:
            print(f"serve-app cost: error: cannot write chart {args.chart}: {err.strerror}", file=sys.stderr)
            return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    return 0


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.4f}" if abs(x) < 1 else f"${x:,.2f}"


def render(r: CostReport) -> str:
    lines = [
        f"Window {r.window_s / 3600:g} h; {r.replicas:g} replica(s) x {r.gpus_per_replica} {r.gpu} at "
        f"{_usd(r.gpu_hourly_usd)}/GPU-hour; Gemini {r.gemini_model} {_usd(r.gemini_input_per_million)} in / "
        f"{_usd(r.gemini_output_per_million)} out per 1M (prices as of {r.gemini_prices_as_of})",
        "",
    ]
    lines.append(f"{'model':<20} {'route':<12} {'prompt':>14} {'completion':>14}")
    for t in r.tokens:
        lines.append(f"{t['model']:<20} {t['route']:<12} {t['prompt']:>14,.0f} {t['completion']:>14,.0f}")
    be = r.break_even_tokens_per_day
    rows = [
        (
            "Self-hosted cost",
            f"{_usd(r.self_hosted_cost_usd)} (GPU {_usd(r.gpu_cost_usd)} + fixed {_usd(r.fixed_cost_usd)})",
        ),
        ("Self-hosted per 1M", f"{_usd(r.self_hosted_usd_per_million)} at the observed utilisation"),
        ("Same tokens on Gemini", _usd(r.self_hosted_tokens_on_gemini_usd)),
        (
            "Spilled to Gemini",
            f"{_usd(r.spilled_cost_usd)} for {r.spilled_prompt_tokens + r.spilled_completion_tokens:,.0f} tokens",
        ),
        ("Gemini per 1M (this mix)", _usd(r.hosted_usd_per_million)),
        ("Volume", f"{r.tokens_per_day:,.0f} tokens/day"),
        (
            "Replica capacity",
            "unknown"
            if r.capacity_tokens_per_second is None
            else f"{r.capacity_tokens_per_second:,.1f} tokens/s ({r.capacity_source})",
        ),
        ("Break-even", "n/a" if be is None else f"{be:,.0f} tokens/day ({r.break_even_replicas} replica(s))"),
        ("Recommendation", f"{r.recommendation}: {r.recommendation_reason}"),
    ]
    lines.append("")
    lines += [f"{k:<25} {v}" for k, v in rows]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def write_chart(r: CostReport, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    top = max(r.tokens_per_day, r.break_even_tokens_per_day or 0.0, 1e6) * 4
    volumes = [top * i / 400 for i in range(401)]
    own, hosted = daily_cost_curves(r, volumes)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(volumes, own, label=f"self-hosted ({r.gpus_per_replica}x {r.gpu} per replica + fixed)")
    ax.plot(volumes, hosted, label=f"Gemini {r.gemini_model}")
    observed = r.self_hosted_cost_usd * 86_400 / r.window_s + r.spilled_cost_usd * 86_400 / r.window_s
    ax.scatter([r.tokens_per_day], [observed], color="black", zorder=3, label="observed (per day)")
    if r.break_even_tokens_per_day is not None:
        ax.axvline(r.break_even_tokens_per_day, linestyle="--", color="grey", label="break-even")
    ax.set_xlabel("tokens per day")
    ax.set_ylabel("USD per day")
    ax.set_title("Cost per day vs daily token volume")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log.info("wrote chart %s", path)
