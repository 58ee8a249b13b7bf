"""py-spy profiles of the request path's processes, summarised as text (commit summaries, not binaries).

`record(pid, seconds, out)` runs `py-spy record --format raw` (collapsed stacks: `frame;frame;... count`,
root first) without pausing the target (`--nonblocking`). `summarize(raw, rate)` turns one such file into
the top frames by self and total samples and a split by layer: each sample is charged to the innermost
frame that belongs to a known layer (pickling, Starlette/uvicorn, serve_app, Ray Serve, Ray core,
asyncio), so a `json.loads` called from serve_app counts as serve_app and a `pickle.dumps` called from
Ray counts as pickling.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import PYTHON, command_line

RATE_HZ = 200
# (layer, pattern on one frame "function (path:line)"), innermost match wins; order breaks ties in a frame.
LAYERS: list[tuple[str, re.Pattern[str]]] = [
    ("pickling / serialization", re.compile(r"pickle|serializ|msgpack|_pickle|copyreg")),
    ("Starlette / FastAPI / uvicorn (ASGI, HTTP)", re.compile(r"starlette/|fastapi/|uvicorn/|h11/|httptools")),
    ("serve_app (our code)", re.compile(r"serve_app/")),
    ("Ray Serve (proxy, router, replica, handle)", re.compile(r"ray/serve/")),
    (
        "Ray core (_raylet, core worker, streaming generator)",
        re.compile(r"ray/_private/|_raylet|ray/util/|ray/_common"),
    ),
    ("asyncio / event loop", re.compile(r"asyncio/|uvloop|selectors\.py")),
    ("logging", re.compile(r"logging/")),
]


def py_spy() -> str:
    return str(Path(PYTHON).parent / "py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = RATE_HZ) -> subprocess.Popen[bytes]:
    """Start py-spy on `pid` for `seconds` (returns at once; wait() on the result)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [py_spy(), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", str(rate)]
    argv += ["--format", "raw", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def parse_raw(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # leaf first
        for name, pattern in LAYERS:
            if pattern.search(frame):
                return name
    return "other (stdlib, C extensions)"


def _short(frame: str) -> str:
    """`fn (/long/site-packages/ray/serve/x.py:12)` -> `fn (ray/serve/x.py:12)`."""
    return re.sub(r"\(/[^)]*(site-packages|work/main|lib/python3\.\d+)/", "(", frame)


def summarize(raw: str, rate: int = RATE_HZ, top: int = 15) -> dict[str, Any]:
    stacks = parse_raw(raw)
    total = sum(n for _, n in stacks)
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        self_c[_short(frames[-1])] += n
        for f in {_short(f) for f in frames}:
            total_c[f] += n
        layers[layer_of(frames)] += n

    def share(c: Counter[str]) -> list[tuple[str, int, float]]:
        return [(k, v, v / total if total else 0.0) for k, v in c.most_common(top)]

    return {
        "samples": total,
        "cpu_s": total / rate,
        "layers": share(layers),
        "self": share(self_c),
        "total": share(total_c),
    }


def summary_md(title: str, s: dict[str, Any], chunks: int | None, wall_s: float) -> str:
    per_chunk = (
        f"; {1e6 * s['cpu_s'] / chunks:,.0f} µs of this process's CPU per chunk ({chunks:,} chunks)" if chunks else ""
    )
    lines = [
        f"### {title}",
        "",
        f"{s['samples']:,} samples at {RATE_HZ} Hz = {s['cpu_s']:.2f} CPU-s over {wall_s:.0f} s "
        f"({s['cpu_s'] / wall_s:.2f} cores){per_chunk}.",
        "",
        "| layer (innermost known frame) | samples | share |",
        "|---|---|---|",
        *(f"| {k} | {v:,} | {p:.1%} |" for k, v, p in s["layers"]),
        "",
        "Top frames by self samples:",
        "",
        "| frame | self | share |",
        "|---|---|---|",
        *(f"| `{k}` | {v:,} | {p:.1%} |" for k, v, p in s["self"]),
        "",
        "Top frames by total (inclusive) samples:",
        "",
        "| frame | total | share |",
        "|---|---|---|",
        *(f"| `{k}` | {v:,} | {p:.1%} |" for k, v, p in s["total"]),
        "",
    ]
    return "\n".join(lines)


def start_profiles(groups: dict[str, list[Any]], duration: float, out: Path) -> dict[str, tuple[Path, Any]]:
    spies = {}
    for role in ("gateway", "replica", "proxy"):
        for p in groups[role][:1]:
            raw = out / f"{role}-{p.pid}.raw"
            spies[role] = (raw, record(p.pid, max(1.0, duration - 1.0), raw))
    return spies


def write_profiles(
    spies: dict[str, tuple[Path, Any]],
    out: Path,
    system: str,
    cell: tuple[str, str, int, int],
    chunks: int,
    wall: float,
) -> None:
    parts = [
        f"# py-spy profile: {system}, {cell[0]} cell, {cell[2]} streams (one token per chunk)",
        "",
        f"Command: `{command_line()}`; load average at the end {[round(x, 2) for x in os.getloadavg()]}. "
        f"{chunks:,} output chunks delivered in {wall:.1f} s. py-spy `record --format raw --nonblocking` "
        f"at {RATE_HZ} Hz over the cell; raw stacks are not committed.",
        "",
    ]
    for role, (raw, proc) in spies.items():
        try:
            proc.wait(timeout=60)
        except Exception:  # a stuck py-spy must not lose the run
            proc.kill()
        if not raw.exists():
            err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
            parts += [f"### {role}: no profile ({err.strip()})", ""]
            continue
        summary = summarize(raw.read_text())
        parts.append(summary_md(f"{role} (pid {raw.stem.split('-')[-1]})", summary, chunks, wall))
        raw.unlink()
    (out / "summary.md").write_text("\n".join(parts))
    logging.getLogger("bench.profile").info("wrote %s", out / "summary.md")
