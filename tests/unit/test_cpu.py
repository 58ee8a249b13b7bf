"""`dtype: auto` on CPU: the CPU's native dtype from /proc/cpuinfo flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.cpu import cpu_native_dtype, describe_dtype, parse_cpu_flags, read_cpu_flags, resolve_dtype

XEON_NO_BF16 = "fpu vme sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni"
SAPPHIRE_RAPIDS = XEON_NO_BF16 + " avx512_bf16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (XEON_NO_BF16.split(), "float32"),
        (SAPPHIRE_RAPIDS.split(), "bfloat16"),
        (["avx512f", "avx512_bf16"], "bfloat16"),  # Cooper Lake / Zen 4: avx512_bf16 without AMX
        (["amx_bf16"], "bfloat16"),
        (["fp", "asimd", "sve", "bf16"], "bfloat16"),  # Arm (Graviton3) Features line
        (["fp", "asimd"], "float32"),
        ([], "float32"),  # no /proc/cpuinfo (macOS): the safe choice
        (["avx512_fp16"], "float32"),  # fp16 is not bf16
    ],
)
def test_cpu_native_dtype(flags: list[str], expected: str) -> None:
    assert cpu_native_dtype(flags) == expected


@pytest.mark.parametrize(
    ("configured", "on_cpu", "flags", "expected"),
    [
        ("auto", True, XEON_NO_BF16.split(), "float32"),
        ("auto", True, SAPPHIRE_RAPIDS.split(), "bfloat16"),
        ("auto", False, XEON_NO_BF16.split(), "auto"),  # a GPU: vLLM's own auto
        ("bfloat16", True, XEON_NO_BF16.split(), "bfloat16"),  # an explicit dtype is never overridden
        ("float32", True, SAPPHIRE_RAPIDS.split(), "float32"),
    ],
)
def test_resolve_dtype(configured: str, on_cpu: bool, flags: list[str], expected: str) -> None:
    assert resolve_dtype(configured, on_cpu, flags) == expected


def test_parse_cpu_flags_reads_every_processor_and_arm_features(tmp_path: Path) -> None:
    text = (
        f"processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: {XEON_NO_BF16}\n\n"
        f"processor\t: 1\nflags\t\t: {XEON_NO_BF16} avx512_bf16\n\n"
        "processor\t: 2\nFeatures\t: fp asimd bf16\n"
    )
    flags = parse_cpu_flags(text)
    assert {"avx512f", "avx512_bf16", "bf16", "asimd"} <= flags and "Intel" not in flags
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert read_cpu_flags(path) == flags
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_describe_dtype_names_the_reason() -> None:
    assert describe_dtype(SAPPHIRE_RAPIDS.split()) == "bfloat16 (CPU has amx_bf16, avx512_bf16)"
    assert describe_dtype(XEON_NO_BF16.split()).startswith("float32 (no avx512_bf16")


def test_make_run_config_resolves_auto_per_cpu_and_keeps_the_rotary_setting() -> None:
    from serve_app.config import load_config
    from serve_app.runner import engine_dtypes

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "local.yaml")
    pool = cfg.pools["smollm2"]
    assert pool.vllm.dtype == "auto"
    assert pool.vllm.extra["compilation_config"] == {"custom_ops": ["all", "-rotary_embedding"]}
    assert engine_dtypes(cfg, True, frozenset(XEON_NO_BF16.split()))["smollm2"].startswith("float32 (no ")
    assert engine_dtypes(cfg, True, frozenset(SAPPHIRE_RAPIDS.split()))["smollm2"].startswith("bfloat16 (CPU has")
    assert engine_dtypes(cfg, False, frozenset())["smollm2"] == "auto (from the config)"
