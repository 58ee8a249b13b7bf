"""Summary (summary.json) and chart (soak.png) of a soak run from its CSVs (bench/soak.py).

    .venv/bin/python -m bench.soak_report bench/results/soak-simulated-<date>/   (re-render from saved files)

RSS growth per process: the median of its first 3 samples after the warm-up (the run's warm-up, or its own
start + warm-up for a process that started later, e.g. a replacement replica) against the median of its last
3 samples; only processes with at least 6 samples after their warm-up are scored. Long-lived = seen in the
first sample and in the last one (the target's population: < 10 % growth).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

GOOD = ("ok", "client_abort", "expected_4xx")
RESTART_WINDOW_S = 60.0  # a 503/429 with Retry-After this soon after a kill is the allowed kind of error
# charted (all processes are in the CSV and the summary): the request path, Ray's core and the client
CHART_ROLES = ("Gateway", "LLMServer", "Proxy", "ServeController", "LoadBoard", "gcs", "raylet", "serve-app", "soak")


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def rss_growth(rows: list[dict[str, str]], warmup: float) -> list[dict[str, Any]]:
    by_pid: dict[int, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_pid[int(r["pid"])].append(r)
    t_first, t_last = min(float(r["t"]) for r in rows), max(float(r["t"]) for r in rows)
    out = []
    for pid, samples in by_pid.items():
        start, end = float(samples[0]["t"]), float(samples[-1]["t"])
        after = [s for s in samples if float(s["t"]) >= max(warmup, start + warmup)]
        if len(after) < 6:
            continue
        base = statistics.median(float(s["rss_mb"]) for s in after[:3])
        last = statistics.median(float(s["rss_mb"]) for s in after[-3:])
        out.append(
            {
                "role": samples[-1]["role"],
                "pid": pid,
                "long_lived": start <= t_first + 1e-6 and end >= t_last - 1e-6,
                "seen_s": [start, end],
                "rss_mb_after_warmup": round(base, 1),
                "rss_mb_end": round(last, 1),
                "rss_mb_peak": round(max(float(s["rss_mb"]) for s in after), 1),
                "rss_growth_pct": round(100 * (last - base) / base, 2) if base else None,
                "fds_after_warmup": int(after[0]["fds"]),
                "fds_end": int(after[-1]["fds"]),
                "fds_peak": max(int(s["fds"]) for s in after),
                "threads_end": int(after[-1]["threads"]),
            }
        )
    return sorted(out, key=lambda r: (not r["long_lived"], r["role"], r["seen_s"][0]))


def error_budget(outcomes: list[dict[str, Any]], kills: list[dict[str, Any]]) -> dict[str, Any]:
    kill_times = [k["t"] for k in kills if "pid" in k]

    def near_kill(t: float) -> bool:
        return any(0 <= t - k <= RESTART_WINDOW_S for k in kill_times)

    shed = [o for o in outcomes if o["outcome"] == "shed_retry_after"]
    examples: dict[str, list[str]] = defaultdict(list)
    for o in outcomes:
        if o["outcome"] not in GOOD and len(examples[o["outcome"]]) < 5 and o["detail"] not in examples[o["outcome"]]:
            examples[o["outcome"]].append(f"t={o['t']} {o['kind']}: {o['detail'][:160]}")
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o["kind"]][o["outcome"]] += 1
    http_5xx = [o for o in outcomes if o["status"] >= 500]
    return {
        "requests": len(outcomes),
        "outcomes": dict(Counter(o["outcome"] for o in outcomes).most_common()),
        "statuses": dict(Counter(str(o["status"]) for o in outcomes).most_common()),
        "served_by": dict(Counter(str(o["served_by"]) for o in outcomes if o["status"] == 200).most_common()),
        "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
        "http_5xx": len(http_5xx),
        "http_5xx_not_shed_near_kill": sum(
            1 for o in http_5xx if not (o["outcome"] == "shed_retry_after" and near_kill(o["t"]))
        ),
        "shed_retry_after": len(shed),
        "shed_retry_after_outside_restart_window": sum(1 for o in shed if not near_kill(o["t"])),
        "client_visible_errors": sum(1 for o in outcomes if o["outcome"] not in GOOD),
        "sse_errors": sum(1 for o in outcomes if o["outcome"] == "sse_error"),
        "error_examples": dict(examples),
    }


def chart(out: Path, warmup: float, kills: list[dict[str, Any]], growth: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    procs, traffic = _read(out / "processes.csv"), _read(out / "traffic.csv")
    long_pids = {g["pid"]: g["role"] for g in growth if g["long_lived"] and g["role"].startswith(CHART_ROLES)}
    fig, axes = plt.subplots(2, 2, figsize=(15, 9), sharex=True)
    for pid, role in sorted(long_pids.items(), key=lambda kv: kv[1]):
        rows = [r for r in procs if int(r["pid"]) == pid]
        ts = [float(r["t"]) / 60 for r in rows]
        axes[0][0].plot(ts, [float(r["rss_mb"]) for r in rows], label=f"{role} ({pid})", lw=1)
        axes[0][1].plot(ts, [int(r["fds"]) for r in rows], label=f"{role} ({pid})", lw=1)
    replicas = defaultdict(list)
    for r in procs:
        if r["role"].startswith("LLMServer") and int(r["pid"]) not in long_pids:
            replicas[int(r["pid"])].append(r)
    for rows in replicas.values():  # replaced replicas: thin grey lines
        axes[0][0].plot([float(r["t"]) / 60 for r in rows], [float(r["rss_mb"]) for r in rows], c="grey", lw=0.6)
    tt = [float(r["t"]) / 60 for r in traffic]
    reqs = [int(r["requests"]) for r in traffic]
    pairs = zip(reqs, reqs[1:], tt, tt[1:], strict=False)
    rate = [0.0] + [(b - a) / max(1e-9, 60 * (t2 - t1)) for a, b, t1, t2 in pairs]
    axes[1][0].plot(tt, rate, label="finished requests/s (client)", lw=1)
    for col, label in (("open_requests", "gateway open_requests"), ("client_in_flight", "client in flight")):
        vals = [float(r[col]) if r[col].replace(".", "").isdigit() else float("nan") for r in traffic]
        axes[1][0].plot(tt, vals, label=label, lw=1)
    axes[1][1].plot(tt, [int(r["errors"]) for r in traffic], label="client-visible errors (cumulative)")
    axes[1][1].plot(tt, [int(r["http_5xx"]) for r in traffic], label="HTTP 5xx incl. 503 shed (cumulative)")
    titles = ("RSS MB (grey: killed and replacement replicas)", "open fds", "traffic", "errors")
    for ax, title in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.axvline(warmup / 60, c="k", ls=":", lw=0.8)
        for k in kills:
            if "pid" in k:
                ax.axvline(k["t"] / 60, c="r", ls="--", lw=0.5)
        ax.legend(fontsize=6, loc="upper left")
    for ax in axes[1]:
        ax.set_xlabel("minutes (dotted: end of warm-up; red dashed: replica SIGKILL)")
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=90)


def summarize(
    out: Path, meta: dict[str, Any], outcomes: list[dict[str, Any]], kills: list[dict[str, Any]]
) -> dict[str, Any]:
    growth = rss_growth(_read(out / "processes.csv"), meta["warmup_s"])
    budget = error_budget(outcomes, kills)
    long_growth = [g["rss_growth_pct"] for g in growth if g["long_lived"] and g["rss_growth_pct"] is not None]
    summary = {
        **meta,
        "kills": kills,
        "error_budget": budget,
        "rss": growth,
        "targets": {
            "max_rss_growth_pct_long_lived": max(long_growth) if long_growth else None,
            "rss_growth_within_10pct": bool(long_growth) and max(long_growth) <= 10,
            "zero_5xx_except_shed_near_kill": budget["http_5xx_not_shed_near_kill"] == 0,
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(out, meta["warmup_s"], kills, growth)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The per-process table for bench/README.md."""
    lines = [
        "| process | pid | RSS MB after warm-up | RSS MB end | growth % | fds after warm-up → end |",
        "|---|---|---|---|---|---|",
    ]
    for g in summary["rss"]:
        if g["long_lived"]:
            fds = f"{g['fds_after_warmup']} → {g['fds_end']}"
            cells = (g["role"], g["pid"], g["rss_mb_after_warmup"], g["rss_mb_end"], g["rss_growth_pct"], fds)
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    saved = json.loads((folder / "summary.json").read_text())
    outcomes = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines()]
    meta = {k: v for k, v in saved.items() if k not in ("kills", "error_budget", "rss", "targets")}
    print(markdown(summarize(folder, meta, outcomes, saved["kills"])))
