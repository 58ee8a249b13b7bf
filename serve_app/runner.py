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

from serve_app.config import ConfigError, load_config

logger = logging.getLogger(__name__)

APP_NAME = "serve_app"


def curl_example(port: int, alias: str, auth: bool) -> str:
    header = ' -H "Authorization: Bearer $SERVE_APP_API_KEY"' if auth else ""
    return (
        f"curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json'{header} \\\n"
        f'  -d \'{{"model": "{alias}", "messages": [{{"role": "user", '
        f'"content": "What is the capital of France?"}}], "max_tokens": 32, "temperature": 0}}\''
    )


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(err)
        return 2
    import ray
    from ray import serve

    from serve_app.app import build_app

    logger.info("starting Ray (logical CPUs: %d, metrics port: %d)", args.num_cpus, args.metrics_port)
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _metrics_export_port=args.metrics_port,
    )
    serve.start(http_options={"host": args.host, "port": args.port})
    logger.info("deploying %s (the first start prepares the model and loads the engine)", args.config)
    started = time.monotonic()
    serve.run(build_app({"config": os.path.abspath(args.config)}), name=APP_NAME, route_prefix="/")
    alias = next(iter(cfg.effective_routes()))
    print(f"\nserve_app is ready on http://{args.host}:{args.port} after {time.monotonic() - started:.0f} s.")
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
