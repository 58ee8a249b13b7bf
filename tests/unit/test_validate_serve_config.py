"""`serve-app validate-config` on a Serve config file: the Gateway's live user_config is checked too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.app import serve_config
from serve_app.cli import main
from serve_app.config import ConfigError, parse_config
from serve_app.serve_configs import load_any_config

CFG: dict[str, Any] = {
    "pools": {"p": {"engine": "simulated", "model": "m"}},
    "routes": {"chat": {"policy": "spill", "pool": "p", "gemini_model": "g"}},
    "gemini": {"api_key_env": "K"},
}


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _doc() -> dict[str, Any]:
    return serve_config(parse_config(CFG, "t"), "app", "/")


def test_a_generated_serve_config_validates(tmp_path: Path) -> None:
    ((label, cfg),) = load_any_config(_write(tmp_path, _doc()))
    assert "applications.0" in label and set(cfg.effective_routes()) == {"chat"}


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda uc: uc["routes"]["chat"].update(policy="spil"), "user_config: routes.chat.policy"),
        (lambda uc: uc["routes"]["chat"].update(pool="nope"), "routes.chat.pool: unknown pool 'nope'"),
        (lambda uc: uc["routes"]["chat"].update(saturation={"enter": 0.5, "exit": 0.9}), "routes.chat.saturation"),
        (lambda uc: uc.update(gemini=None), "routes.chat: uses Gemini but the `gemini` section is missing"),
    ],
)
def test_a_live_config_typo_is_named_with_its_key_path(tmp_path: Path, mutate: Any, expected: str) -> None:
    doc = _doc()
    (gw,) = [d for d in doc["applications"][0]["deployments"] if d["name"] == "Gateway"]
    mutate(gw["user_config"])
    path = _write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_any_config(path)
    assert str(path) in str(info.value) and expected in str(info.value)
    assert main(["validate-config", str(path)]) == 2
