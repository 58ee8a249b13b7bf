"""One real local Ray cluster (and Serve instance) for the whole integration session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import ray.serve._private.constants  # noqa: F401  (read now, before the environment below: see there)

from serve_app import ray_env
from tests.support import free_port

# The shipped Ray environment (proxy guard, throughput-optimized transport), as serve-app run and the
# KubeRay manifests set it, before the session's cluster starts: its processes (controller, proxy, every
# replica) inherit it, so every integration test runs on the path users get. This test process itself
# keeps Ray's defaults (its constants were read above): the tests call handles from plain synchronous code,
# which needs the router on its own loop; the Gateway picks its handles' transport in its own process.
ray_env.apply()

TEST_KEYS_ENV = "SERVE_APP_TEST_API_KEYS"
TEST_KEYS = ("sk-test-alpha-123", "sk-test-beta-456")
# The Gemini key the gateway replicas read (gemini.api_key_env) when a test points a route at the stand-in.
GEMINI_TEST_KEY_ENV = "SERVE_APP_TEST_GEMINI_KEY"
GEMINI_TEST_KEY = "standin-session-key-789"


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    metrics_port = free_port()
    # Replica processes inherit the driver's environment: client API keys for the auth tests.
    os.environ[TEST_KEYS_ENV] = ",".join(TEST_KEYS)
    os.environ[GEMINI_TEST_KEY_ENV] = GEMINI_TEST_KEY
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        logging_level="WARNING",
        log_to_driver=False,
    )
    http_port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        yield {"http_port": http_port, "metrics_port": metrics_port, "base": f"http://127.0.0.1:{http_port}"}
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(cluster: dict[str, Any], name: str, config: dict[str, Any]) -> str:
    """Deploy an app built from an inline config under /<name>; return its OpenAI base URL."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(config), name=name, route_prefix=f"/{name}")
    return f"{cluster['base']}/{name}/v1"


def deploy_declarative(cluster: dict[str, Any], name: str, config: dict[str, Any]) -> str:
    """Deploy the way `serve deploy` and KubeRay do (a Serve config through the controller)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serve_app.app import serve_config
    from serve_app.config import parse_config

    doc = serve_config(parse_config(config, "test config"), name, f"/{name}")
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(doc))
    client._wait_for_application_running(name, timeout_s=120)
    return f"{cluster['base']}/{name}/v1"


REAL_APP = "real"
REAL_KV_GIB = 1.0
REAL_MAX_MODEL_LEN = 2048


def real_config() -> dict[str, Any]:
    """configs/local.yaml's pool (the real SmolLM2 engine), as the tests deploy it."""
    from serve_app.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(root, "configs", "local.yaml"))
    pool = cfg.pools["smollm2"].model_dump(mode="json")
    pool["vllm"].update(cpu_kv_cache_space_gib=REAL_KV_GIB, max_model_len=REAL_MAX_MODEL_LEN)
    return {
        "pools": {"smollm2": pool},
        "routes": {"smollm2": {"policy": "self_hosted_only", "pool": "smollm2"}},
        "gateway": {"num_cpus": 0.1},
    }


@pytest.fixture(scope="session")
def real_app(ray_cluster: dict[str, Any]) -> Iterator[str]:
    """The real vLLM engine (SmolLM2 on CPU) behind the real gateway: started once per test session."""
    from ray import serve

    base = deploy(ray_cluster, REAL_APP, real_config())
    try:
        yield base
    finally:
        serve.delete(REAL_APP)


def real_stats() -> dict[str, Any]:
    from ray import serve

    handle = serve.get_deployment_handle("LLMServer-smollm2", app_name=REAL_APP)
    result: dict[str, Any] = handle.stats.remote().result(timeout_s=30)
    return result
