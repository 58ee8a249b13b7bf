"""One real local Ray cluster (and Serve instance) for the whole integration session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import free_port


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    metrics_port = free_port()
    os.environ.setdefault("RAY_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S", "5")
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
