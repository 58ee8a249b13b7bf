"""`serve-app run`: start a local Ray cluster, deploy the app from a config file, print how to call it.

This is what `make run` uses. In production the same app is deployed by KubeRay (serveConfigV2) or by
`serve deploy`; this command is the local, single-machine way.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from typing import Any

from serve_app.config import AppConfig, ConfigError, load_config
from serve_app.cpu import describe_dtype, read_cpu_flags, resolve_dtype

logger = logging.getLogger(__name__)

APP_NAME = "serve_app"


def curl_example(port: int, alias: str, auth: bool) -> str:
    header = ' -H "Authorization: Bearer $SERVE_APP_API_KEY"' if auth else ""
    return (
        f"curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json'{header} \\\n"
        f'  -d \'{{"model": "{alias}", "messages": [{{"role": "user", '
        f'"content": "What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}\''
    )


def engine_dtypes(cfg: AppConfig, on_cpu: bool, cpu_flags: frozenset[str]) -> dict[str, str]:
    """The dtype each vLLM pool's engine will run in (what `build_engine_args` resolves in the replica)."""
    out = {}
    for name, pool in cfg.pools.items():
        if pool.engine != "vllm":
            continue
        dtype = resolve_dtype(pool.vllm.dtype, on_cpu, cpu_flags)
        auto_on_cpu = pool.vllm.dtype == "auto" and on_cpu
        out[name] = describe_dtype(cpu_flags) if auto_on_cpu else f"{dtype} (from the config)"
    return out


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(err)
        return 2
    from serve_app import ray_env

    # Before Ray Serve is imported here (it reads them at import: this process builds the app and its
    # handles), and inherited by every Ray process of this local cluster: the proxy guard, the fast path.
    effective = ray_env.apply()
    transport = "throughput-optimized" if effective["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" else "Ray defaults"
    import ray
    from ray import serve

    from serve_app.app import build_app

    logger.info("starting Ray (logical CPUs: %d, metrics port: %d)", args.num_cpus, args.metrics_port)
    logger.info("Ray Serve transport: %s (serve_app/ray_env.py; an env var you set wins)", transport)
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _metrics_export_port=args.metrics_port,
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    # A local cluster without GPUs is vLLM's CPU platform: `dtype: auto` becomes the CPU's native dtype.
    gpus = ray.cluster_resources().get("GPU")  # type: ignore[no-untyped-call]
    dtypes = engine_dtypes(cfg, not gpus, read_cpu_flags())
    dtype_note = "; ".join(f"{pool}: {d}" for pool, d in dtypes.items())
    if dtype_note:
        logger.info("engine dtype: %s", dtype_note)
    logger.info("deploying %s (the first start prepares the model and loads the engine)", args.config)
    started = time.monotonic()
    serve.run(build_app({"config": os.path.abspath(args.config)}), name=APP_NAME, route_prefix="/")
    alias = next(iter(cfg.effective_routes()))
    ready = f"\nserve_app is ready on http://{args.host}:{args.port} after {time.monotonic() - started:.0f} s"
    print(ready + (f" (engine dtype: {dtype_note})." if dtype_note else "."))
    print("Try:\n" + curl_example(args.port, alias, cfg.gateway.api_keys_env is not None) + "\n")
    print(f"Prometheus metrics: http://127.0.0.1:{args.metrics_port}/metrics   Stop: Ctrl-C", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down")
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="serve the app locally (Ray + Serve in this process)")
    p.add_argument("--config", default="configs/local.yaml", help="app config YAML")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus export port")
    p.add_argument("--num-cpus", type=int, default=max(8, os.cpu_count() or 1), help="logical CPUs for Ray")
    p.set_defaults(func=_run)
