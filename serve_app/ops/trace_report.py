"""The pure half of `serve-app trace`: load profiles, per-second aggregation, CSV and the chart.

Nothing here does I/O except `write_csv` and `write_chart`; the driver (serve_app.ops.trace) feeds it
plain records, so every number in a trace can be checked against a hand-made input.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Profile = Literal["ramp", "step", "spike"]
PROFILES: tuple[Profile, ...] = ("ramp", "step", "spike")
Cell = float | int | str | None
Row = dict[str, Cell]

SPILLED = "gemini"  # value of the x-served-by header when a request went to the hosted overflow
SELF_HOSTED = "self-hosted"

BASE_COLUMNS = (
    "second",
    "offered_concurrency",
    "in_flight",
    "started",
    "completed",
    "errors",
    "ttft_p50_s",
    "ttft_p99_s",
    "tokens_per_s",
    "self_hosted",
    "spilled",
    "spilled_share",
)
POOL_FIELDS = ("replicas", "waiting", "running", "kv_cache_usage", "tokens_per_s", "saturated", "breaker")


def schedule(profile: Profile, duration_s: int, base: int, peak: int) -> list[int]:
    """Offered concurrency for each second of the run.

    ramp:  base -> peak over the first half, back to base over the second (shows both directions).
    step:  base for the first quarter, peak for the middle half, base for the last quarter.
    spike: base, with peak for a tenth of the run (at least 1 s) starting at 40 %.
    """
    if duration_s <= 0:
        return []
    out = []
    for s in range(duration_s):
        x = s / duration_s
        if profile == "ramp":
            top = (duration_s - 1) // 2  # the second at which the peak is reached
            frac = s / top if s <= top and top else 1 - (s - top) / max(duration_s - 1 - top, 1)
            value = base + (peak - base) * frac
        elif profile == "step":
            value = peak if 0.25 <= x < 0.75 else base
        elif profile == "spike":
            start = int(duration_s * 0.4)
            value = peak if start <= s < start + max(1, round(duration_s * 0.1)) else base
        else:
            raise ValueError(f"unknown profile {profile!r} (one of {', '.join(PROFILES)})")
        out.append(round(value))
    return out


@dataclass
class RequestRecord:
    """One request as the client saw it; times are seconds since the start of the trace."""

    start: float
    served_by: str | None = None  # x-served-by response header
    first_token: float | None = None
    end: float | None = None
    tokens: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens) per content chunk
    error: str | None = None  # None: success
    cancelled: bool = False  # still running when the trace ended; neither success nor error

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start


@dataclass
class Sample:
    """What the app reported at the start of one second."""

    in_flight: int = 0
    pools: Mapping[str, Mapping[str, Any]] | None = None  # GET /admin/pools -> "pools"
    deployments: Mapping[str, tuple[int, int]] | None = None  # deployment -> (target, running)


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) with linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _bucket(t: float) -> int:
    return max(0, math.floor(t))


def aggregate(
    records: Iterable[RequestRecord],
    offered: Sequence[int],
    samples: Mapping[int, Sample],
    ttft_window_s: int = 5,
) -> list[Row]:
    """One row per second, from second 0 to the last second anything happened in.

    TTFT percentiles cover first tokens that arrived in the trailing `ttft_window_s` seconds (one second
    rarely holds enough samples for a p99); the other counts belong to the second they happened in.
    The spilled share counts requests (that got response headers) by the second they started in.
    """
    recs = list(records)
    last = len(offered) - 1
    for r in recs:
        for t in (r.start, r.end, r.first_token):
            if t is not None:
                last = max(last, _bucket(t))
    if samples:
        last = max(last, max(samples))
    n = last + 1
    started, completed, errors, selfh, spilled = ([0] * n for _ in range(5))
    tokens = [0.0] * n
    ttfts: list[list[float]] = [[] for _ in range(n)]
    for r in recs:
        started[_bucket(r.start)] += 1
        if r.end is not None and not r.cancelled:
            (completed if r.error is None else errors)[_bucket(r.end)] += 1
        if r.first_token is not None and r.ttft is not None:
            ttfts[_bucket(r.first_token)].append(r.ttft)
        for t, k in r.tokens:
            tokens[_bucket(t)] += k
        if r.served_by is not None:
            (spilled if r.served_by == SPILLED else selfh)[_bucket(r.start)] += 1
    rows: list[Row] = []
    for s in range(n):
        window = [x for b in range(max(0, s - ttft_window_s + 1), s + 1) for x in ttfts[b]]
        sample = samples.get(s, Sample())
        served = selfh[s] + spilled[s]
        row: Row = {
            "second": s,
            "offered_concurrency": offered[s] if s < len(offered) else 0,
            "in_flight": sample.in_flight if s in samples else None,
            "started": started[s],
            "completed": completed[s],
            "errors": errors[s],
            "ttft_p50_s": _round(percentile(window, 50)),
            "ttft_p99_s": _round(percentile(window, 99)),
            "tokens_per_s": tokens[s],
            "self_hosted": selfh[s],
            "spilled": spilled[s],
            "spilled_share": _round(spilled[s] / served) if served else None,
        }
        row.update(_pool_cells(sample.pools))
        for name, (target, running) in sorted((sample.deployments or {}).items()):
            row[f"ray_{name}_target"] = target
            row[f"ray_{name}_running"] = running
        rows.append(row)
    return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _pool_cells(pools: Mapping[str, Mapping[str, Any]] | None) -> Row:
    out: Row = {}
    for name, stats in sorted((pools or {}).items()):
        for key in POOL_FIELDS:
            value = stats.get(key)
            if isinstance(value, bool):
                value = int(value)
            elif not isinstance(value, int | float | str):
                value = None
            out[f"pool_{name}_{key}"] = value
    return out


def columns(rows: Sequence[Row]) -> list[str]:
    """The fixed columns, then every pool/deployment column any row has, in a stable order."""
    extra = sorted({k for row in rows for k in row} - set(BASE_COLUMNS))
    return [*BASE_COLUMNS, *extra]


def write_csv(rows: Sequence[Row], path: Path) -> None:
    cols = columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


def _series(rows: Sequence[Row], key: str) -> list[float]:
    out = []
    for row in rows:
        v = row.get(key)
        out.append(float(v) if isinstance(v, int | float) else math.nan)
    return out


def write_chart(rows: Sequence[Row], path: Path, title: str = "serve-app trace") -> None:
    """One PNG, panels sharing the time axis: load, latency, throughput, spill and replicas."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in a headless CLI and in tests
    import matplotlib.pyplot as plt

    cols = columns(rows)
    x = [float(s) for s in _series(rows, "second")]
    panels: list[tuple[str, list[tuple[str, str]]]] = [
        ("concurrency", [("offered_concurrency", "offered"), ("in_flight", "in flight")]),
        ("requests/s", [("completed", "completed"), ("errors", "errors")]),
        ("TTFT (s)", [("ttft_p50_s", "p50"), ("ttft_p99_s", "p99")]),
        ("tokens/s", [("tokens_per_s", "received")]),
        ("spilled share", [("spilled_share", "to Gemini")]),
        (
            "replicas",
            [(c, c.removeprefix("pool_")) for c in cols if c.startswith("pool_") and c.endswith("_replicas")]
            + [(c, c.removeprefix("ray_")) for c in cols if c.startswith("ray_")],
        ),
        (
            "engine queue",
            [
                (c, c.removeprefix("pool_"))
                for c in cols
                if c.startswith("pool_") and (c.endswith("_waiting") or c.endswith("_running"))
            ],
        ),
    ]
    fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(10, 2.0 * len(panels)))
    for ax, (label, series) in zip(axes, panels, strict=True):
        for key, name in series:
            ax.plot(x, _series(rows, key), label=name, drawstyle="steps-post")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(loc="upper left", fontsize="small")
    axes[-1].set_xlabel("seconds since start")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
