"""build_app(args) -> serve.Application: the import path for `serve run`, `serve deploy` and KubeRay.

`args` is either {"config": "<path to YAML>"} (what `serve run serve_app.app:build_app config=...` passes)
or the whole config inline (the keys of AppConfig: pools, routes, gateway, gemini), which is what a
KubeRay serveConfigV2 carries.

Deployment layout: one `LLMServer-<pool>` deployment per pool (engine options in its init args, so an
engine restarts only when its own config changes) and one `Gateway` ingress whose user_config holds the
route table and Gemini settings (a change there reconfigures the gateway in place).
"""

from __future__ import annotations

import logging
from typing import Any, cast

from ray import serve
from ray.serve import Application, Deployment

from serve_app.config import AppConfig, ConfigError, PoolConfig, load_config, parse_config
from serve_app.gateway import Gateway
from serve_app.llm_server import LLMServer

logger = logging.getLogger(__name__)


def config_from_args(args: dict[str, Any]) -> AppConfig:
    if "pools" in args:
        return parse_config(dict(args), "application args")
    path = args.get("config")
    if not isinstance(path, str):
        raise ConfigError("application args: config: give a config file path (config=FILE) or the config inline")
    return load_config(path)


def pool_deployment_options(name: str, pool: PoolConfig) -> dict[str, Any]:
    d = pool.deployment
    opts: dict[str, Any] = {
        "name": f"LLMServer-{name}",
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": pool.gpus_per_replica()},
        "health_check_period_s": d.health_check_period_s,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
    }
    if d.autoscaling is not None:
        from serve_app.autoscaling import ray_autoscaling_config

        opts["autoscaling_config"] = ray_autoscaling_config(d.autoscaling)
    else:
        opts["num_replicas"] = d.num_replicas or 1
    return opts


def gateway_user_config(cfg: AppConfig) -> dict[str, Any]:
    """The live-reloadable part: routes and Gemini settings."""
    return {
        "routes": {
            alias: r.model_dump(mode="json", exclude_defaults=True) for alias, r in cfg.effective_routes().items()
        },
        "gemini": cfg.gemini.model_dump(mode="json", exclude_defaults=True) if cfg.gemini else None,
    }


def serve_config(cfg: AppConfig, name: str = "serve_app", route_prefix: str = "/") -> dict[str, Any]:
    """A Serve config (for `serve deploy`, `serve run` or KubeRay serveConfigV2) that uses build_app.

    Engines and gateway options go into `args`; the route table and Gemini settings go into the Gateway's
    `user_config` override and each pool's autoscaling into its own deployment override. Serve hashes
    `args` into the application's code version, so a change there restarts every replica; a `user_config`
    change only calls Gateway.reconfigure, and an autoscaling bound change only updates the controller
    (engines keep running).
    """
    args = cfg.model_dump(
        mode="json",
        exclude={"routes": True, "gemini": True, "pools": {"__all__": {"deployment": {"autoscaling"}}}},
        exclude_defaults=True,
    )
    return {
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": "serve_app.app:build_app",
                "args": args,
                "deployments": [
                    {"name": "Gateway", "user_config": gateway_user_config(cfg)},
                    *pool_autoscaling_overrides(cfg),
                ],
            }
        ]
    }


def pool_autoscaling_overrides(cfg: AppConfig) -> list[dict[str, Any]]:
    """Per-deployment `autoscaling_config` overrides: bounds change without touching `args`.

    Serve applies a deployment override's autoscaling_config in place (no replica restart) unless its
    `policy` changes; see serve_app.autoscaling (LIVE_FIELDS) for what is live.
    """
    from serve_app.autoscaling import ray_autoscaling_config

    return [
        {
            "name": f"LLMServer-{name}",
            "num_replicas": None,  # build_app saw no autoscaling in args and set a fixed count
            "autoscaling_config": ray_autoscaling_config(pool.deployment.autoscaling),
        }
        for name, pool in cfg.pools.items()
        if pool.deployment.autoscaling is not None
    ]


def build_app(args: dict[str, Any]) -> Application:
    cfg = config_from_args(args)
    pools: dict[str, Any] = {}
    served: dict[str, str] = {}
    for name, pool in cfg.pools.items():
        deployment = cast(Deployment, serve.deployment(LLMServer)).options(**pool_deployment_options(name, pool))
        pools[name] = deployment.bind(name, pool.model_dump(mode="json"))
        served[name] = pool.served_model_name or name
    gw = cfg.gateway
    return (
        cast(Deployment, Gateway)
        .options(
            name="Gateway",
            num_replicas=gw.num_replicas,
            max_ongoing_requests=gw.max_ongoing_requests,
            ray_actor_options={"num_cpus": gw.num_cpus, "resources": dict(gw.resources)},
            graceful_shutdown_timeout_s=gw.graceful_shutdown_timeout_s,
            user_config=gateway_user_config(cfg),
        )
        .bind(pools, served, gw.model_dump(mode="json"))
    )
