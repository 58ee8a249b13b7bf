"""Config loading: every shipped config loads; errors name file, key path and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.cli import main
from serve_app.config import ConfigError, expand_path, load_config, parse_config, parse_live_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("serve-"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.pools and cfg.effective_routes()


def test_local_default_is_the_real_engine() -> None:
    cfg = load_config(ROOT / "configs/local.yaml")
    assert {p.engine for p in cfg.pools.values()} == {"vllm"}
    assert all(p.vllm.enforce_eager for p in cfg.pools.values())


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pools: {a: {model: m, typo_key: 1}}", "pools.a.typo_key: Extra inputs are not permitted"),
        ("pools: {a: {model: m, vllm: {gpu_memory_utilization: 1.5}}}", "pools.a.vllm.gpu_memory_utilization:"),
        ("pools: {}", "pools: "),
        ("pools: {a: {model: m}}\nroutes: {x: {pool: b}}", "unknown pool 'b'"),
        (
            "pools: {a: {model: m}}\nroutes: {x: {policy: spill, pool: a}}",
            "routes.x: Value error, policy spill needs gemini_model".replace("Value error, ", ""),
        ),
        (
            "pools: {a: {model: m}}\nroutes: {x: {policy: hosted_only, gemini_model: g}}",
            "the `gemini` section is missing",
        ),
        ("pools: {a: {model: m, deployment: {num_replicas: 2, autoscaling: {}}}}", "set num_replicas or autoscaling"),
        ("pools: {a: {model: m, deployment: {autoscaling: {min_replicas: 3, max_replicas: 2}}}}", "min_replicas (3)"),
        ("pools: {a: {model: m}}\nroutes: {x: {pool: a, saturation: {enter: 0.5, exit: 0.9}}}", "exit (0.9)"),
        ("- just\n- a list", "<root>: expected a mapping"),
        ("pools: [unclosed", "invalid YAML"),
    ],
)
def test_errors_name_file_key_and_reason(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": ")
    assert expected in message


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_validate_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-config", str(ROOT / "configs/local.yaml")]) == 0
    assert "ok" in capsys.readouterr().out
    bad = _write(tmp_path, "pools: {a: {model: m, engine: tpu}}")
    assert main(["validate-config", str(bad)]) == 2
    assert "pools.a.engine" in capsys.readouterr().err


def test_expand_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SA_X", "/data")
    monkeypatch.delenv("SA_MISSING", raising=False)
    assert expand_path("${SA_X}/m") == "/data/m"
    assert expand_path("${SA_MISSING:-/fallback}/m") == "/fallback/m"
    assert expand_path("~/m").startswith("/")


def test_live_config_requires_gemini_for_hosted_routes() -> None:
    with pytest.raises(ConfigError, match=r"Gateway user_config: routes\.x"):
        parse_live_config({"routes": {"x": {"policy": "hosted_only", "gemini_model": "g"}}})
    live = parse_live_config({"routes": {"x": {"pool": "a"}}, "gemini": None})
    assert live.routes["x"].policy == "self_hosted_only"


def test_default_routes_one_per_pool() -> None:
    cfg = parse_config({"pools": {"a": {"model": "m"}, "b": {"model": "n"}}})
    assert {k: (r.policy, r.pool) for k, r in cfg.effective_routes().items()} == {
        "a": ("self_hosted_only", "a"),
        "b": ("self_hosted_only", "b"),
    }
