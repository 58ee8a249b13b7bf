"""Cost report math: self-hosted vs Gemini per million tokens, break-even volume, a recommendation.

Pure functions over plain data; cost_cli.py gathers the inputs (Prometheus or a metrics snapshot).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# The app's metric names, as Ray exports them (custom metrics get a `ray_` prefix, counters `_total`).
# Everything in the cost tool refers to these constants only.
TOKENS_METRIC = "ray_serve_app_tokens_total"  # labels: model, route, kind
REQUESTS_METRIC = "ray_serve_app_requests_total"  # labels: model, route, outcome
REPLICAS_METRIC = "ray_serve_app_pool_replicas"  # gauge, label: pool
ROUTE_SELF_HOSTED = "self_hosted"
ROUTE_GEMINI = "gemini"
KIND_PROMPT = "prompt"
KIND_COMPLETION = "completion"

HOURS_PER_MONTH = 365 * 24 / 12  # 730: how monthly fixed costs are spread over hours
SECONDS_PER_DAY = 86_400.0
DEFAULT_PROMPT_SHARE = 0.75  # used only when no tokens at all were observed
SPIKY_PEAK_TO_MEAN = 3.0  # peak demand more than 3x the mean: replicas would idle most of the time


class CostError(ValueError):
    """Input the cost report cannot use; the CLI prints it as one line and exits 2."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass(frozen=True)
class TokenUsage:
    model: str
    route: str
    prompt: float
    completion: float

    @property
    def total(self) -> float:
        return self.prompt + self.completion


def token_usage(samples: Iterable[Sample]) -> list[TokenUsage]:
    """Sum the token counter's series by (model, route) and kind; other labels (Ray's) are summed over."""
    sums: dict[tuple[str, str], list[float]] = {}
    for s in samples:
        if s.name != TOKENS_METRIC:
            continue
        key = (s.labels.get("model", ""), s.labels.get("route", ""))
        slot = sums.setdefault(key, [0.0, 0.0])
        kind = s.labels.get("kind")
        if kind == KIND_PROMPT:
            slot[0] += s.value
        elif kind == KIND_COMPLETION:
            slot[1] += s.value
    return [TokenUsage(m, r, p, c) for (m, r), (p, c) in sorted(sums.items())]


def request_counts(samples: Iterable[Sample]) -> list[dict[str, Any]]:
    sums: dict[tuple[str, str, str], float] = {}
    for s in samples:
        if s.name == REQUESTS_METRIC:
            key = (s.labels.get("model", ""), s.labels.get("route", ""), s.labels.get("outcome", ""))
            sums[key] = sums.get(key, 0.0) + s.value
    return [{"model": m, "route": r, "outcome": o, "count": v} for (m, r, o), v in sorted(sums.items())]


def pool_replicas(samples: Iterable[Sample]) -> float | None:
    """Replicas over all pools; a pool reported by several processes counts once (max)."""
    per_pool: dict[str, float] = {}
    for s in samples:
        if s.name == REPLICAS_METRIC:
            pool = s.labels.get("pool", "")
            per_pool[pool] = max(per_pool.get(pool, 0.0), s.value)
    return sum(per_pool.values()) if per_pool else None


# ------------------------------------------------------------------------------------------ prices
@dataclass(frozen=True)
class HostedPrice:
    model: str
    input_per_million: float
    output_per_million: float
    as_of: str

    def cost(self, prompt: float, completion: float) -> float:
        return (prompt * self.input_per_million + completion * self.output_per_million) / 1e6


def _bundled(name: str) -> Any:
    return json.loads(resources.files("serve_app").joinpath("data").joinpath(name).read_text())


def load_price_table(path: str | None = None) -> dict[str, Any]:
    """The dated Gemini price table: bundled, or a file of the same shape."""
    if path is None:
        table: Any = _bundled("gemini_prices.json")
    else:
        try:
            table = json.loads(Path(path).read_text())
        except OSError as err:
            raise CostError(f"{path}: cannot read: {err.strerror}") from None
        except json.JSONDecodeError as err:
            raise CostError(f"{path}: invalid JSON: {err.msg} at line {err.lineno}") from None
    if not isinstance(table, dict) or not isinstance(table.get("models"), dict):
        raise CostError(f"{path or 'bundled price table'}: expected an object with a `models` mapping")
    return table


def hosted_price(table: Mapping[str, Any], model: str) -> HostedPrice:
    entry = table["models"].get(model)
    if not isinstance(entry, dict):
        raise CostError(f"no price for Gemini model {model!r} (table has: {', '.join(sorted(table['models']))})")
    try:
        inp, out = float(entry["input_per_million"]), float(entry["output_per_million"])
    except (KeyError, TypeError, ValueError):
        raise CostError(f"price of {model!r} needs numeric input_per_million and output_per_million") from None
    if inp < 0 or out < 0:
        raise CostError(f"price of {model!r} must not be negative")
    return HostedPrice(model, inp, out, str(table.get("as_of", "undated")))


def gpu_hourly_usd(gpu: str, override: float | None = None) -> tuple[str, float]:
    """(GPU name, $/GPU-hour) from the bundled table, or the override."""
    if override is not None:
        if override < 0:
            raise CostError(f"--gpu-hourly-usd must not be negative (got {override})")
        return gpu, override
    for key, entry in _bundled("gpus.json")["gpus"].items():
        if gpu.lower() in [key.lower(), *(a.lower() for a in entry.get("aliases", []))]:
            if entry.get("hourly_usd") is None:
                raise CostError(f"no recorded price for {key} ({entry.get('price_source')}); pass --gpu-hourly-usd")
            return key, float(entry["hourly_usd"])
    raise CostError(f"unknown GPU {gpu!r}; pass --gpu-hourly-usd")


# ------------------------------------------------------------------------------------ break-even
def break_even(
    replica_daily_usd: float,
    fixed_daily_usd: float,
    capacity_tokens_per_day: float,
    hosted_usd_per_million: float,
) -> tuple[float | None, int | None]:
    """Tokens/day from which self-hosting never costs more than the hosted API, and the replicas there.

    Self-hosted $/day is a step function, S(V) = max(1, ceil(V / capacity)) x replica + fixed; hosted
    $/day is linear, H(V) = V x price. Just past each step S jumps by one replica, so the first crossing
    can flip back; this returns the durable one. Every step n wins entirely once
    n x replica + fixed <= (n - 1) x capacity x price, i.e. n >= (fixed + capacity x price) / margin with
    margin = capacity x price - replica (what a full replica saves per day). The step before that wins
    from (m x replica + fixed) / price on (m = n - 1). If a full replica costs more than the API (margin <= 0),
    self-hosting never wins: (None, None).
    """
    if capacity_tokens_per_day <= 0 or replica_daily_usd < 0 or fixed_daily_usd < 0 or hosted_usd_per_million < 0:
        raise CostError("capacity must be positive and costs must not be negative")
    price = hosted_usd_per_million / 1e6
    cap_usd = capacity_tokens_per_day * price  # what the API would charge for one full replica's tokens
    margin = cap_usd - replica_daily_usd
    if margin <= 0:
        return None, None
    n_full = max(1, math.ceil((fixed_daily_usd + cap_usd) / margin - 1e-9))
    m = n_full - 1
    if m == 0:  # free replicas and no fixed costs: wins from the first token
        return 0.0, 1
    # Step m wins from here on; n_full's definition guarantees this lies inside step m.
    return (m * replica_daily_usd + fixed_daily_usd) / price, m


def recommend(
    tokens_per_day: float,
    break_even_tokens_per_day: float | None,
    peak_to_mean: float | None,
    spiky_threshold: float = SPIKY_PEAK_TO_MEAN,
) -> tuple[str, str]:
    """(recommendation, reason): low or spiky volume -> hosted; steady high volume -> self-host the core."""
    if break_even_tokens_per_day is None:
        return "hosted", "self-hosting never breaks even: a fully used replica costs more per token than Gemini"
    if tokens_per_day < break_even_tokens_per_day:
        return "hosted", (
            f"volume {tokens_per_day:,.0f} tokens/day is below the break-even {break_even_tokens_per_day:,.0f}"
        )
    if peak_to_mean is not None and peak_to_mean > spiky_threshold:
        return "hosted", (
            f"volume is spiky (peak {peak_to_mean:.1f}x the mean > {spiky_threshold:g}x): replicas sized for "
            "the peaks would idle"
        )
    return "self_host_core_spill_rest", (
        f"steady volume {tokens_per_day:,.0f} tokens/day >= break-even {break_even_tokens_per_day:,.0f}: "
        "self-host the steady core, spill peaks to Gemini"
    )


# ----------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class CostInputs:
    window_s: float
    tokens: list[TokenUsage]
    gpu: str
    gpu_hourly_usd: float
    replicas: float
    gpus_per_replica: int
    hosted: HostedPrice
    requests: list[dict[str, Any]] = field(default_factory=list)
    fixed_monthly_usd: float = 0.0
    capacity_tokens_per_second: float | None = None  # per replica
    capacity_source: str = "unknown"
    target_utilization: float = 0.8  # applied to a given capacity, not to an observed peak
    peak_to_mean: float | None = None


@dataclass
class CostReport:
    window_s: float
    gpu: str
    gpu_hourly_usd: float
    replicas: float
    gpus_per_replica: int
    gemini_model: str
    gemini_input_per_million: float
    gemini_output_per_million: float
    gemini_prices_as_of: str
    fixed_monthly_usd: float
    tokens: list[dict[str, Any]]
    requests: list[dict[str, Any]]
    self_hosted_prompt_tokens: float
    self_hosted_completion_tokens: float
    spilled_prompt_tokens: float
    spilled_completion_tokens: float
    gpu_cost_usd: float
    fixed_cost_usd: float
    self_hosted_cost_usd: float
    self_hosted_usd_per_million: float | None
    self_hosted_tokens_on_gemini_usd: float
    spilled_cost_usd: float
    hosted_usd_per_million: float
    tokens_per_day: float
    capacity_tokens_per_second: float | None
    capacity_source: str
    usable_capacity_tokens_per_second: float | None  # capacity x target utilization (given capacity only)
    replica_daily_usd: float
    fixed_daily_usd: float
    break_even_tokens_per_day: float | None
    break_even_replicas: int | None
    peak_to_mean: float | None
    recommendation: str
    recommendation_reason: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(inp: CostInputs) -> None:
    if inp.window_s <= 0:
        raise CostError(f"window must be positive (got {inp.window_s} s)")
    if inp.replicas < 0 or inp.gpus_per_replica < 1:
        raise CostError("replicas must be >= 0 and GPUs per replica >= 1")
    if inp.fixed_monthly_usd < 0:
        raise CostError(f"fixed monthly cost must not be negative (got {inp.fixed_monthly_usd})")
    if inp.capacity_tokens_per_second is not None and inp.capacity_tokens_per_second <= 0:
        raise CostError(f"capacity must be positive (got {inp.capacity_tokens_per_second} tokens/s)")
    if not 0 < inp.target_utilization <= 1:
        raise CostError(f"target utilization must be in (0, 1] (got {inp.target_utilization})")


def compute_report(inp: CostInputs) -> CostReport:
    _check(inp)
    own = [t for t in inp.tokens if t.route == ROUTE_SELF_HOSTED]
    spilled = [t for t in inp.tokens if t.route == ROUTE_GEMINI]
    sp, sc = sum(t.prompt for t in own), sum(t.completion for t in own)
    gp, gc = sum(t.prompt for t in spilled), sum(t.completion for t in spilled)
    hours = inp.window_s / 3600
    gpu_cost = inp.replicas * inp.gpus_per_replica * inp.gpu_hourly_usd * hours
    fixed_cost = inp.fixed_monthly_usd * hours / HOURS_PER_MONTH
    notes: list[str] = []
    # The hosted rate for this traffic's prompt/completion mix (self-hosted tokens first, else all).
    prompt_share = sp / (sp + sc) if sp + sc else (gp / (gp + gc) if gp + gc else DEFAULT_PROMPT_SHARE)
    if not sp + sc + gp + gc:
        notes.append(f"no tokens observed: hosted rate assumes a {DEFAULT_PROMPT_SHARE:.0%} prompt share")
    hosted_rate = inp.hosted.cost(prompt_share * 1e6, (1 - prompt_share) * 1e6)
    tokens_per_day = (sp + sc + gp + gc) * SECONDS_PER_DAY / inp.window_s
    replica_daily = inp.gpus_per_replica * inp.gpu_hourly_usd * 24
    fixed_daily = inp.fixed_monthly_usd * 24 / HOURS_PER_MONTH
    capacity = inp.capacity_tokens_per_second
    usable: float | None = None
    be_volume: float | None = None
    be_replicas: int | None = None
    if capacity is not None:
        usable = capacity * (inp.target_utilization if inp.capacity_source == "given" else 1.0)
        be_volume, be_replicas = break_even(replica_daily, fixed_daily, usable * SECONDS_PER_DAY, hosted_rate)
        rec, reason = recommend(tokens_per_day, be_volume, inp.peak_to_mean)
        if inp.capacity_source == "observed peak":
            notes.append("capacity is the observed peak per replica, a lower bound: break-even is an upper bound")
    else:
        rec, reason = "undetermined", "no replica capacity: pass --capacity-tokens-per-second"
    if inp.peak_to_mean is None:
        notes.append("peak-to-mean unknown (metrics snapshot): spikiness not judged")
    return CostReport(
        window_s=inp.window_s,
        gpu=inp.gpu,
        gpu_hourly_usd=inp.gpu_hourly_usd,
        replicas=inp.replicas,
        gpus_per_replica=inp.gpus_per_replica,
        gemini_model=inp.hosted.model,
        gemini_input_per_million=inp.hosted.input_per_million,
        gemini_output_per_million=inp.hosted.output_per_million,
        gemini_prices_as_of=inp.hosted.as_of,
        fixed_monthly_usd=inp.fixed_monthly_usd,
        tokens=[asdict(t) for t in inp.tokens],
        requests=list(inp.requests),
        self_hosted_prompt_tokens=sp,
        self_hosted_completion_tokens=sc,
        spilled_prompt_tokens=gp,
        spilled_completion_tokens=gc,
        gpu_cost_usd=gpu_cost,
        fixed_cost_usd=fixed_cost,
        self_hosted_cost_usd=gpu_cost + fixed_cost,
        self_hosted_usd_per_million=(gpu_cost + fixed_cost) / (sp + sc) * 1e6 if sp + sc else None,
        self_hosted_tokens_on_gemini_usd=inp.hosted.cost(sp, sc),
        spilled_cost_usd=inp.hosted.cost(gp, gc),
        hosted_usd_per_million=hosted_rate,
        tokens_per_day=tokens_per_day,
        capacity_tokens_per_second=capacity,
        capacity_source=inp.capacity_source,
        usable_capacity_tokens_per_second=usable,
        replica_daily_usd=replica_daily,
        fixed_daily_usd=fixed_daily,
        break_even_tokens_per_day=be_volume,
        break_even_replicas=be_replicas,
        peak_to_mean=inp.peak_to_mean,
        recommendation=rec,
        recommendation_reason=reason,
        notes=notes,
    )


def daily_cost_curves(report: CostReport, volumes: Iterable[float]) -> tuple[list[float], list[float]]:
    """(self-hosted, hosted) $/day at each tokens/day volume, for the chart.

    Self-hosted with a known capacity scales replicas to the volume (at least one); without one it keeps
    the observed replica count.
    """
    own: list[float] = []
    hosted: list[float] = []
    cap = report.usable_capacity_tokens_per_second
    for v in volumes:
        if cap:
            n = max(1, math.ceil(v / (cap * SECONDS_PER_DAY)))
            own.append(n * report.replica_daily_usd + report.fixed_daily_usd)
        else:
            own.append(report.replicas * report.replica_daily_usd + report.fixed_daily_usd)
        hosted.append(v * report.hosted_usd_per_million / 1e6)
    return own, hosted
