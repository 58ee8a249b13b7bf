"""Tables, totals and the chart of bench/failover.py (no I/O besides reading the gateway log and writing the PNG)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import statistics
from pathlib import Path
from typing import Any

from bench.failover_client import StreamResult, reference


def gateway_log_lines(session_dir: str, run_id: str) -> dict[str, dict[str, Any]]:
    """request_id -> the gateway's request-log JSON line (serve_app.requests) for this run's requests."""
    out: dict[str, dict[str, Any]] = {}
    for path in glob.glob(os.path.join(session_dir, "logs", "serve", "replica_*Gateway*.log")):
        with open(path, errors="replace") as fh:
            for line in fh:
                if run_id not in line:
                    continue
                start = line.find("{")  # Ray's text format: "<level> <time> <deployment> ... -- {json}"
                if start < 0:
                    continue
                with contextlib.suppress(ValueError):
                    msg = json.loads(line[start:])
                    if isinstance(msg, dict) and str(msg.get("request_id", "")).startswith(run_id):
                        out[msg["request_id"]] = msg
    return out


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    vs = sorted(values)
    return vs[min(len(vs) - 1, max(0, round(q / 100 * (len(vs) - 1))))]


def expected_text(r: StreamResult, engine: str, ref_text: str | None) -> str | None:
    return reference(r.max_tokens) if engine == "simulated" else ref_text


def switch_facts(r: StreamResult, kills: list[dict[str, Any]], pool: list[dict[str, Any]]) -> dict[str, Any]:
    """For the first failover of a continued stream: the kill it followed, the time from that SIGKILL to the
    first output chunk after the switch, and the pool's max `waiting` (gateway view) in that window."""
    if not r.comments:
        return {"kill": "", "resume_after_kill_s": "", "pool_waiting_max": ""}
    t0 = r.stats.start - r.started_at
    arrived, before, _ = r.comments[0]
    rel = arrived - t0
    done = [k for k in kills if "killed_at" in k and k["killed_at"] <= rel + 0.05]
    if not done or before >= len(r.stats.chunks):
        return {"kill": "", "resume_after_kill_s": "", "pool_waiting_max": ""}
    kill = done[-1]
    resumed = r.stats.chunks[before][0] - t0
    window = [
        p["waiting"] for p in pool if kill["killed_at"] - 0.5 <= p["t"] <= resumed + 0.5 and p["waiting"] is not None
    ]
    return {
        "kill": kills.index(kill) + 1,
        "resume_after_kill_s": round(resumed - kill["killed_at"], 4),
        "pool_waiting_max": max(window) if window else "",
    }


def rows(
    results: list[StreamResult],
    logs: dict[str, dict[str, Any]],
    engine: str,
    ref: str | None,
    kills: list[dict[str, Any]],
    pool: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    out = []
    for r in results:
        s = r.stats
        exp = expected_text(r, engine, ref)
        stalls = r.stalls()
        log = logs.get(r.request_id, {})
        out.append(
            {
                "index": r.index,
                "request_id": r.request_id,
                "started_s": round(r.started_at, 3),
                "max_tokens": r.max_tokens,
                "status": s.status,
                "done": s.done,
                "error": s.error or "",
                "ok": s.ok,
                "continued": bool(r.comments),
                "failover_comments": " | ".join(c[2] for c in r.comments),
                "stall_s": round(max(stalls), 4) if stalls else "",
                **switch_facts(r, kills, pool),
                "max_gap_s": round(max(s.itl_s), 4) if s.itl_s else "",
                "ttft_s": round(s.ttft_s, 4) if s.ttft_s is not None else "",
                "duration_s": round((s.end or s.start) - s.start, 3),
                "usage_tokens": s.usage_tokens if s.usage_tokens is not None else "",
                "ids": r.ids,
                "text_ok": "" if exp is None or not s.ok else r.text == exp,
                "log_outcome": log.get("outcome", ""),
                "log_failovers": ";".join(log.get("failovers") or []),
                "log_retries": log.get("retries", ""),
            }
        )
    return out


def summarize(table: list[dict[str, Any]], kills: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(table)
    ok = [r for r in table if r["ok"]]
    continued = [r for r in table if r["continued"]]
    stalls = [float(r["stall_s"]) for r in continued if r["stall_s"] != ""]
    resumes = [float(r["resume_after_kill_s"]) for r in continued if r["resume_after_kill_s"] != ""]
    ttfts = [float(r["ttft_s"]) for r in table if r["ttft_s"] != ""]
    checked = [r for r in table if r["text_ok"] != ""]
    median_ttft = statistics.median(ttfts) if ttfts else None
    stall_p50, stall_p99 = pct(stalls, 50), pct(stalls, 99)
    return {
        "streams": n,
        "completed_without_client_visible_error": len(ok),
        "completed_share": round(len(ok) / n, 4) if n else None,
        "continued_streams": len(continued),
        "continued_ok": sum(1 for r in continued if r["ok"]),
        "errors": sorted({r["error"] for r in table if r["error"]}),
        "kills": sum(1 for k in kills if "killed_at" in k),
        "stall_s": {"p50": stall_p50, "p99": stall_p99, "max": max(stalls) if stalls else None, "n": len(stalls)},
        "resume_after_kill_s": {"p50": pct(resumes, 50), "p99": pct(resumes, 99), "n": len(resumes)},
        "ttft_s": {"p50": median_ttft, "p99": pct(ttfts, 99)},
        "text_checked": len(checked),
        "text_mismatch": sum(1 for r in checked if r["text_ok"] is False),
        "text_mismatch_continued": sum(1 for r in checked if r["text_ok"] is False and r["continued"]),
        "multiple_ids": sum(1 for r in table if r["ids"] > 1),
        "log_failover_streams": sum(1 for r in table if r["log_failovers"]),
        "targets": {
            "completed_share>=0.99": bool(n) and len(ok) / n >= 0.99,
            "stall_p50<=median_ttft": None if stall_p50 is None or median_ttft is None else stall_p50 <= median_ttft,
            "stall_p99<=median_ttft": None if stall_p99 is None or median_ttft is None else stall_p99 <= median_ttft,
            "text_mismatch==0": all(r["text_ok"] is not False for r in checked),
        },
    }


def chart(table: list[dict[str, Any]], kills: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for r in table:
        color = "tab:red" if not r["ok"] else ("tab:orange" if r["continued"] else "tab:green")
        ax.plot([r["started_s"], r["started_s"] + r["duration_s"]], [r["index"]] * 2, color=color, lw=1)
    for k in kills:
        if "killed_at" in k:
            ax.axvline(k["killed_at"], color="black", lw=0.8, ls="--")
    ax.set_xlabel("seconds since start (dashed: SIGKILL of a replica)")
    ax.set_ylabel("stream")
    ax.set_title("streams: green ok, orange continued after a failover, red client-visible error")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
