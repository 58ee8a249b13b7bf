"""Validating Serve config files (serve deploy / KubeRay serveConfigV2) that run serve_app, as a whole.

`serve-app validate-config` accepts both a serve_app config file and a Serve config file; for the latter
each serve_app application's `args` and its Gateway's live `user_config` are checked together, with errors
naming the key path inside the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from serve_app.config import AppConfig, ConfigError, load_config, parse_config, parse_live_config

SERVE_IMPORT_PATH = "serve_app.app:build_app"


def parse_serve_config(data: dict[str, Any], source: str) -> list[tuple[str, AppConfig]]:
    """Validate a Serve config file (serve deploy / KubeRay serveConfigV2) that runs serve_app.

    Each application built by serve_app is checked whole: its `args` (pools, gateway) and the Gateway
    deployment's `user_config` (routes, gemini: what a live edit changes), with errors naming the key
    path inside the file, e.g. `applications.0.deployments.0.user_config: routes.chat.policy: ...`.
    """
    apps = data.get("applications")
    if not isinstance(apps, list):
        raise ConfigError(f"{source}: applications: expected a list of applications")
    out: list[tuple[str, AppConfig]] = []
    for i, app in enumerate(apps):
        where = f"{source}: applications.{i}"
        if not isinstance(app, dict) or app.get("import_path") != SERVE_IMPORT_PATH:
            continue
        args = app.get("args") or {}
        if not isinstance(args, dict):
            raise ConfigError(f"{where}.args: expected a mapping")
        merged = {k: v for k, v in args.items() if k != "config"}
        if "config" in args and "pools" not in args:
            merged = load_config(str(args["config"])).model_dump(mode="json", exclude_defaults=True)
        for j, dep in enumerate(app.get("deployments") or []):
            if isinstance(dep, dict) and dep.get("name") == "Gateway" and "user_config" in dep:
                live = parse_live_config(dep["user_config"], f"{where}.deployments.{j}.user_config")
                merged["routes"] = {a: r.model_dump(mode="json") for a, r in live.routes.items()}
                merged["gemini"] = live.gemini.model_dump(mode="json") if live.gemini else None
        out.append((f"{where} ({app.get('name', 'serve_app')})", parse_config(merged, where)))
    if not out:
        raise ConfigError(f"{source}: applications: no application uses {SERVE_IMPORT_PATH}")
    return out


def load_any_config(path: str | os.PathLike[str]) -> list[tuple[str, AppConfig]]:
    """A serve_app config file, or a Serve config file holding serve_app applications."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    except yaml.YAMLError:
        return [(str(p), load_config(p))]  # load_config words the YAML error
    if isinstance(data, dict) and "applications" in data:
        return parse_serve_config(data, str(p))
    return [(str(p), load_config(p))]
