"""The Ray Serve environment serve_app runs with: one table for `serve-app run`, `serve-app serve-config`,
the KubeRay manifests, the tests and the benchmarks.

Ray Serve reads these variables when its modules are imported, in every process it starts (controller,
proxies, replicas), so they are process environment, not application config:

- `PROXY_ENV` (proxy process): the guard middleware (serve_app/proxy_guard.py).
- `FAST_PATH_ENV` (every process): Ray 2.60's throughput-optimized transport: gRPC between the proxy,
  the Gateway and the LLMServer replicas instead of Ray actor calls (both hops); user code and the
  router on the replica's main event loop (no thread hop per chunk); the garbage collector frozen after
  start-up.
  Chosen by the interleaved real-engine benchmark (bench/results/overhead-20261201). Two of the preset's
  settings are put back on purpose:
  - direct ingress stays off: it opens a second HTTP port per Gateway replica (30000+, all interfaces
    under HAProxy) that would bypass the proxy guard and the cluster's one Serve service; traffic keeps
    flowing through the proxy port;
  - request-path logs are written as they happen (Ray's preset buffers 1,000 lines and would hold an
    operator's request log lines back at low traffic, and lose them in a crash) and still go to stderr.
    They cost per request, not per chunk.

A variable already set in the environment wins (`setdefault`): `RAY_SERVE_THROUGHPUT_OPTIMIZED=0
RAY_SERVE_USE_GRPC_BY_DEFAULT=0` gives Ray's defaults back (`RAY_DEFAULTS_ENV`).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

from serve_app.proxy_guard import ENV_VAR as PROXY_GUARD_ENV_VAR
from serve_app.proxy_guard import IMPORT_PATH as PROXY_GUARD_IMPORT_PATH

PROXY_ENV: dict[str, str] = {PROXY_GUARD_ENV_VAR: PROXY_GUARD_IMPORT_PATH}

FAST_PATH_ENV: dict[str, str] = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Spelled out although the preset implies it: Ray derives the proxy's own choice
    # (RAY_SERVE_PROXY_USE_GRPC) from this variable *before* the preset applies, so without it the
    # proxy -> Gateway hop stays on actor calls (found by the py-spy profile, bench/results/profile-*).
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}

# Ray's defaults, for an A/B run against the shipped environment (bench: `app+ray-defaults`).
RAY_DEFAULTS_ENV: dict[str, str] = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0"}

RAY_ENV: dict[str, str] = {**PROXY_ENV, **FAST_PATH_ENV}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every RAY_ENV variable the environment does not set yet; return what is in effect."""
    env = os.environ if environ is None else environ
    for name, value in RAY_ENV.items():
        env.setdefault(name, value)
    return {name: env[name] for name in RAY_ENV}


def serve_uses_grpc() -> bool:
    """What Ray Serve in *this* process chose for handle calls (its constants are read at import).

    The Gateway gives its LLMServer handles this choice explicitly, so the transport follows the Gateway
    process's environment even when the app was built in a process that imported Ray Serve without it.
    """
    from ray.serve._private import constants

    return bool(constants.RAY_SERVE_USE_GRPC_BY_DEFAULT)
