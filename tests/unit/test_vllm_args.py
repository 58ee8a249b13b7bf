"""Flat vLLM engine arguments: checked against vLLM's own argument set, split into engine / front-end args."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve_app.cli import main
from serve_app.config import PoolConfig, VLLMEngineArgs, parse_config
from serve_app.engines.vllm import build_engine_args, check_engine_args


@pytest.mark.parametrize(
    ("vllm", "problems"),
    [
        ({"enable_prefix_caching": True, "tool_call_parser": "hermes"}, []),  # engine field, front-end option
        ({"extra": {"swap_space": 4}}, [("swap_space", "not an AsyncEngineArgs field")]),
        ({"max_num_seq": 8}, [("max_num_seq", "did you mean max_num_seqs?")]),
        ({"enable-prefix-caching": True}, [("enable-prefix-caching", "did you mean enable_prefix_caching?")]),
        ({"model": "other"}, [("model", "set by serve_app: use pools.<name>.model")]),
        ({"extra": {"disable_log_stats": True}}, [("disable_log_stats", "set by serve_app")]),
        ({}, []),
    ],
)
def test_check_engine_args(vllm: dict[str, Any], problems: list[tuple[str, str]]) -> None:
    got = check_engine_args(VLLMEngineArgs.model_validate(vllm))
    assert [k for k, _ in got] == [k for k, _ in problems]
    for (_, reason), (_, want) in zip(got, problems, strict=True):
        assert want in reason


def test_flat_keys_reach_vllm_like_extra_and_win_over_it() -> None:
    args = VLLMEngineArgs.model_validate(
        {
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "block_size": 32,
            "tool_call_parser": "hermes",
            "extra": {"block_size": 16, "max_logprobs": 7, "enable_auto_tool_choice": True},
        }
    )
    engine, frontend = build_engine_args("/m", "served", args)
    assert (engine.enable_prefix_caching, engine.block_size, engine.max_logprobs) == (False, 32, 7)
    assert (frontend.tool_call_parser, frontend.enable_auto_tool_choice) == ("hermes", True)
    assert engine.enforce_eager is True and engine.served_model_name == ["served"]
    assert engine.enable_lora is False


def test_lora_modules_turn_lora_on_and_become_vllm_serve_lora_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERS", "/data/adapters")
    args = VLLMEngineArgs.model_validate({"lora_modules": {"sql": "${ADAPTERS}/sql"}, "max_lora_rank": 32})
    engine, frontend = build_engine_args("/m", "base", args)
    assert engine.enable_lora is True and engine.max_lora_rank == 32
    assert frontend.lora_modules is not None
    [module] = frontend.lora_modules
    assert (module.name, module.path, module.base_model_name) == ("sql", "/data/adapters/sql", "base")


def test_unknown_flat_key_fails_engine_build_too() -> None:
    with pytest.raises(ValueError, match=r"vllm\.max_num_seq:"):
        build_engine_args("/m", "s", VLLMEngineArgs.model_validate({"max_num_seq": 8}))


def test_flat_keys_survive_the_config_round_trip() -> None:
    pool = PoolConfig.model_validate({"model": "m", "vllm": {"enable_prefix_caching": True, "extra": {"a": 1}}})
    again = PoolConfig.model_validate(pool.model_dump(mode="json"))
    assert again.vllm.engine_kwargs() == {"a": 1, "enable_prefix_caching": True}
    cfg = parse_config({"pools": {"p": {"model": "m", "vllm": {"block_size": 32}}}})
    dumped = cfg.model_dump(mode="json", exclude_defaults=True)
    assert dumped["pools"]["p"]["vllm"] == {"block_size": 32}


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_validate_config_names_file_key_path_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(
        tmp_path,
        "pools:\n  big:\n    model: m\n"
        "    vllm: {max_num_seq: 8, enable_prefix_caching: true, extra: {swap_spac: 1}}\n",
    )
    assert main(["validate-config", path]) == 2
    err = capsys.readouterr().err.splitlines()
    assert f"{path}: pools.big.vllm.max_num_seq: not an AsyncEngineArgs field" in err[1]
    assert "did you mean max_num_seqs?" in err[1]
    assert err[0].startswith(f"{path}: pools.big.vllm.extra.swap_spac: ")


def test_validate_config_accepts_known_flat_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "pools:\n  p:\n    model: m\n    vllm: {enable_prefix_caching: true, max_loras: 2}\n")
    assert main(["validate-config", path]) == 0
    assert "ok" in capsys.readouterr().out
