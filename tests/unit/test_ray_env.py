"""The Ray Serve environment serve_app ships (serve_app/ray_env.py) is the same everywhere it starts Ray:
`serve-app run`, the KubeRay pods, `serve-app serve-config`, the integration tests."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from bench.systems import fast_path_env
from serve_app import ray_env
from serve_app.cli import main
from tests.unit.kuberay_manifests import OVERLAYS, REPO, pod_templates, ray_container


def test_shipped_environment_is_the_throughput_optimized_transport_on_the_proxy_port() -> None:
    env = ray_env.RAY_ENV
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"  # the proxy's hop reads it before the preset applies
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"  # traffic stays behind the proxy guard
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "serve_app.proxy_guard:middlewares"
    assert env["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] == "1"  # request log lines are not held back
    assert set(ray_env.RAY_DEFAULTS_ENV) <= set(env)


@pytest.mark.parametrize(
    ("preset", "expected_optimized", "expected_guard"),
    [
        ({}, "1", "serve_app.proxy_guard:middlewares"),
        ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, "0", "serve_app.proxy_guard:middlewares"),
        ({"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "mine:mw"}, "1", "mine:mw"),
    ],
)
def test_apply_fills_only_what_the_operator_did_not_set(
    preset: dict[str, str], expected_optimized: str, expected_guard: str
) -> None:
    environ = dict(preset)
    effective = ray_env.apply(environ)
    assert environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == expected_optimized
    assert environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == expected_guard
    assert effective == {k: environ[k] for k in ray_env.RAY_ENV}
    assert set(environ) == set(ray_env.RAY_ENV)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_kuberay_pod_runs_ray_with_the_shipped_environment(overlay: str) -> None:
    # Proxies run on every node and replicas on the worker groups: each Ray container needs all of it.
    for name, template in pod_templates(overlay).items():
        env = {e["name"]: e.get("value") for e in ray_container(template).get("env", [])}
        missing = {k: v for k, v in ray_env.RAY_ENV.items() if env.get(k) != v}
        assert not missing, f"{overlay}/{name}: env differs from serve_app.ray_env.RAY_ENV: {missing}"


def test_serve_config_carries_the_replica_environment() -> None:
    # `serve deploy` onto a cluster started elsewhere: the replicas (Gateway -> LLMServer gRPC, user code
    # on the main loop) get the fast path from the application's runtime_env.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["serve-config", str(REPO / "configs" / "local.yaml")]) == 0
    doc = yaml.safe_load(out.getvalue())
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    assert app["runtime_env"] == {"env_vars": ray_env.FAST_PATH_ENV}


# What Ray Serve 2.60 itself makes of an environment: its constants, read in a fresh interpreter.
_PROBE = (
    "import json; from ray.serve._private import constants as c; print(json.dumps({k: getattr(c, k) for k in ("
    "'RAY_SERVE_USE_GRPC_BY_DEFAULT', 'RAY_SERVE_PROXY_USE_GRPC', 'RAY_SERVE_ENABLE_DIRECT_INGRESS', "
    "'RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD', 'RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP', "
    "'RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE', 'RAY_SERVE_LOG_TO_STDERR')}))"
)


def ray_constants(env: dict[str, str]) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_SERVE_")}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_ray_reads_the_shipped_environment_as_grpc_on_both_hops_without_direct_ingress() -> None:
    shipped = ray_constants(ray_env.apply({}))
    assert shipped == {
        "RAY_SERVE_USE_GRPC_BY_DEFAULT": True,  # Gateway -> LLMServer
        "RAY_SERVE_PROXY_USE_GRPC": True,  # proxy -> Gateway (the preset alone leaves it off)
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": False,
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": False,
        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": False,
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": 1,
        "RAY_SERVE_LOG_TO_STDERR": True,
    }


def test_the_benchmarks_ray_defaults_variant_is_ray_as_it_comes() -> None:
    # bench `app+ray-defaults`: its env, then what `serve-app run` fills in, must equal an empty environment.
    env = fast_path_env("app+ray-defaults")
    assert ray_constants(ray_env.apply(env)) == ray_constants({})
