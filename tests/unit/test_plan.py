"""Capacity planner: parameter counts, KV bytes, vLLM's CPU KV figure, fit/suggestions, CLI errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from serve_app.cli import main
from serve_app.config import VLLMEngineArgs
from serve_app.ops.plan import (
    GiB,
    MiB,
    PlanInputs,
    kv_bytes_per_token,
    load_gpu,
    plan,
    plan_cpu,
    plan_cpu_kv_tokens,
)
from serve_app.ops.plan_model import (
    ModelSpec,
    PlanError,
    QuantScheme,
    count_params,
    data_json,
    load_model,
    preset_names,
    spec_from_config,
    weights_bytes,
)


def spec(name: str) -> ModelSpec:
    return load_model(name).spec


@pytest.mark.parametrize("name", preset_names())
def test_param_count_within_2_percent_of_published(name: str) -> None:
    source = load_model(name)
    assert source.published_params is not None
    total = count_params(source.spec).total
    assert abs(total / source.published_params - 1) < 0.02, (name, total)


# Published / derivable figures: Llama-3.1-8B bf16 = 32 layers x 8 kv heads x 128 x 2 (K,V) x 2 bytes;
# Llama-3.1-70B = 80 x 8 x 128 x 2 x 2; SmolLM2 = 30 x 3 x 64 x 2 x 2 (FACTS.md: 23,040);
# DeepSeek-V3 MLA = 61 layers x (512 latent + 64 rope) x 2 bytes.
@pytest.mark.parametrize(
    ("name", "kv_bytes", "tp", "expected"),
    [
        ("llama-3.1-8b", 2, 1, 131_072),
        ("llama-3.1-70b", 2, 1, 327_680),
        ("llama-3.1-70b", 2, 4, 81_920),  # 8 kv heads split over 4 ranks
        ("llama-3.1-70b", 2, 16, 40_960),  # TP > kv heads: one replicated head per rank
        ("llama-3.1-8b", 1, 1, 65_536),  # fp8 KV cache
        ("smollm2-135m", 2, 1, 23_040),
        ("qwen2.5-7b", 2, 1, 57_344),
        ("mistral-7b", 2, 1, 131_072),
        ("gemma-2-9b", 2, 1, 344_064),
        ("deepseek-v3", 2, 1, 70_272),
        ("deepseek-v3", 2, 8, 70_272),  # MLA latent is replicated, not split
    ],
)
def test_kv_bytes_per_token(name: str, kv_bytes: int, tp: int, expected: int) -> None:
    assert kv_bytes_per_token(spec(name), kv_bytes, tp) == expected


def test_llama_8b_bf16_weights_are_16_06_gb() -> None:
    # 8.03B params x 2 bytes: the model card's ~16 GB in BF16.
    assert weights_bytes(spec("llama-3.1-8b"), QuantScheme("none")) / 1e9 == pytest.approx(16.06, abs=0.01)


def test_awq_bytes_are_4_bit_plus_scale_and_zero_per_group_of_128() -> None:
    s = spec("llama-3.1-8b")
    counts = count_params(s)
    expected_linear = math.ceil(counts.linear / 128 * (64 + 2 + 0.5))
    kept = (counts.embedding + counts.lm_head + counts.other) * 2
    assert weights_bytes(s, QuantScheme("awq", bits=4, group_size=128)) == kept + expected_linear


def test_deepseek_defaults_to_its_fp8_checkpoint() -> None:
    r = plan(PlanInputs(spec("deepseek-v3"), load_gpu("H200"), tensor_parallel_size=8, max_model_len=32768))
    assert r.quantization == "fp8" and r.fits
    assert any("MLA" in n for n in r.notes)


@pytest.mark.parametrize(
    ("space_gib", "block_size", "max_len", "expected"),
    [
        (1, 128, None, 46_592),  # FACTS.md: "CPU KV cache size: 46,592 tokens" (364 blocks of 128)
        (2, 128, None, 93_184),
        (1, 16, None, 46_592),  # 2,912 blocks of 16: the same here by coincidence of the remainder
        (1, 128, 2000, 45_500),  # vLLM logs int(364 / cdiv(2000, 128) * 2000)
    ],
)
def test_cpu_kv_tokens_match_vllm(space_gib: float, block_size: int, max_len: int | None, expected: int) -> None:
    assert plan_cpu_kv_tokens(spec("smollm2-135m"), space_gib, "auto", block_size, max_len) == expected


def test_local_config_folder_matches_the_preset(tmp_path: Path) -> None:
    cfg = data_json("models.json")["smollm2-135m"]["config"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert plan_cpu(load_model(str(tmp_path)).spec, 1)["kv_cache_tokens"] == 46_592


def test_llama_8b_awq_on_l4() -> None:
    r = plan(PlanInputs(spec("llama-3.1-8b"), load_gpu("L4"), 0.90, 8192, "awq"))
    budget = int(23034 * MiB * 0.90)
    assert r.budget_bytes_per_gpu == budget
    assert r.available_kv_bytes_per_gpu == budget - r.weights_bytes_per_gpu - 2 * GiB
    blocks = r.available_kv_bytes_per_gpu // (131_072 * 16)
    assert r.kv_cache_tokens == blocks * 16
    assert r.max_concurrent_sequences_at_max_model_len == blocks // (8192 // 16)
    assert r.max_concurrent_sequences_at_typical_len == blocks // (1024 // 16)
    assert r.fits and r.shortfall_bytes == 0 and r.suggestions == []
    VLLMEngineArgs(**r.engine_args)  # the engine args are valid for our config's vllm: section
    assert r.kuberay_worker_resources["limits"]["nvidia.com/gpu"] == 1


def test_gemma_sliding_layers_keep_only_the_window() -> None:
    r = plan(PlanInputs(spec("gemma-2-9b"), load_gpu("A100-80"), max_model_len=8192))
    layer_blocks = r.available_kv_bytes_per_gpu // (344_064 // 42 * 16)
    assert r.max_concurrent_sequences_at_max_model_len == layer_blocks // (21 * 512 + 21 * 256)
    assert r.max_concurrent_sequences_at_typical_len == layer_blocks // (42 * 64)


def test_too_long_context_suggests_the_largest_fitting_length() -> None:
    inp = PlanInputs(spec("llama-3.1-8b"), load_gpu("L4"))  # bf16 at 131,072 tokens
    r = plan(inp)
    assert not r.fits and r.shortfall_bytes > 0
    by_action = {s["action"]: s["value"] for s in r.suggestions}
    n = by_action["lower_max_model_len"]
    assert plan(replace(inp, max_model_len=n)).fits
    assert not plan(replace(inp, max_model_len=n + 16)).fits
    assert plan(replace(inp, tensor_parallel_size=by_action["raise_tensor_parallel_size"])).fits
    assert plan(replace(inp, gpu=load_gpu(by_action["bigger_gpu"]))).fits


@pytest.mark.parametrize(
    ("model", "gpu", "tp", "quant", "max_len", "fits"),
    [
        ("llama-3.1-8b", "L4", 1, "awq", 8192, True),
        ("llama-3.1-8b", "L4", 1, None, 8192, True),
        ("llama-3.1-70b", "H100", 1, None, 8192, False),
        ("llama-3.1-70b", "H100", 2, None, 8192, True),
        ("llama-3.1-70b", "A100-80", 1, "awq", 8192, True),
        ("qwen2.5-7b", "A10G", 1, None, 32768, True),
        ("smollm2-135m", "L4", 1, None, 8192, True),
    ],
)
def test_fits_table(model: str, gpu: str, tp: int, quant: str | None, max_len: int, fits: bool) -> None:
    r = plan(PlanInputs(spec(model), load_gpu(gpu), 0.90, max_len, quant, tensor_parallel_size=tp))
    assert r.fits is fits
    assert (r.shortfall_bytes > 0) is not fits


def test_nothing_single_fits_suggests_a_combination() -> None:
    r = plan(PlanInputs(spec("llama-3.1-70b"), load_gpu("L4")))
    combo = r.suggestions[0]
    assert combo["action"] == "combine"
    v = combo["value"]
    alt = PlanInputs(
        spec("llama-3.1-70b"),
        load_gpu("L4"),
        quantization=v["quantization"],
        tensor_parallel_size=v["tensor_parallel_size"],
    )
    assert plan(alt).fits


def test_missing_config_field_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="num_hidden_layers"):
        spec_from_config({"hidden_size": 8, "num_attention_heads": 2}, "x")


def test_json_output_has_the_spelled_out_fields(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["plan", "--model", "llama-3.1-8b", "--gpu", "L4", "--quantization", "awq", "--max-model-len", "8192", "--json"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "weights_bytes_per_gpu",
        "kv_cache_bytes_per_token",
        "available_kv_bytes_per_gpu",
        "kv_cache_tokens",
        "max_concurrent_sequences_at_max_model_len",
        "max_concurrent_sequences_at_typical_len",
        "fits",
        "shortfall_bytes",
        "suggestions",
        "engine_args",
        "kuberay_worker_resources",
        "notes",
    ):
        assert key in out
    assert out["kv_cache_bytes_per_token"] == 131_072


def test_cpu_mode_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "smollm2-135m", "--device", "cpu", "--cpu-kv-space-gib", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache_tokens"] == 46_592


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model", "--gpu", "L4"], "unknown model"),
        (["--model", "llama-3.1-8b", "--gpu", "TPU9"], "unknown GPU"),
        (["--model", "llama-3.1-8b", "--gpu", "L4", "--gpu-memory-utilization", "1.5"], "utilization"),
        (["--model", "llama-3.1-8b", "--gpu", "L4", "--max-model-len", "-5"], "max model len"),
        (["--model", "llama-3.1-8b", "--gpu", "L4", "--typical-len", "0"], "typical len"),
        (["--model", "llama-3.1-8b", "--gpu", "L4", "--max-model-len", "200000"], "max_position_embeddings"),
        (["--model", "llama-3.1-8b", "--gpu", "L4", "--tensor-parallel-size", "3"], "tensor parallel"),
        (["--model", "llama-3.1-8b", "--gpu", "L4", "--overhead-gib", "-1"], "overhead"),
        (["--model", "llama-3.1-8b"], "--gpu is required"),
        (["--model", "smollm2-135m", "--device", "cpu", "--cpu-kv-space-gib", "0"], "CPU KV space"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    assert main(["plan", "--model", str(tmp_path), "--gpu", "L4"]) == 2
    assert "num_hidden_layers" in capsys.readouterr().err


def test_argparse_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "llama-3.1-8b", "--gpu", "L4", "--max-model-len", "lots"])
    assert exc.value.code == 2
