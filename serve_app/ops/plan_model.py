"""Planner inputs: a HF config.json → ModelSpec, parameter counts, weight bytes; the GPU table.

Pure functions over plain data. Presets live in serve_app/data/models.json as config.json excerpts, so a
preset and a local checkpoint folder go through exactly the same code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class PlanError(ValueError):
    """Input the planner cannot use; the CLI prints it as one line and exits 2."""


GiB = 1024**3
MiB = 1024**2
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def dtype_bytes(dtype: str) -> int:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name.startswith("fp8"):  # fp8, fp8_e4m3, fp8_e5m2
        return 1
    if name not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r} (known: bfloat16, float16, float32, fp8)")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class QuantScheme:
    """How decoder linear weights are stored. Embeddings, lm_head and norms stay in the model dtype."""

    method: str  # "none" | "fp8" | "awq" | "gptq"
    bits: int = 16
    group_size: int = 128
    block_scales: bool = False  # fp8 with 128x128 block scales (DeepSeek-V3 checkpoints)

    def linear_bytes(self, params: int, model_dtype_bytes: int) -> int:
        if self.method == "none":
            return params * model_dtype_bytes
        if self.method == "fp8":
            # One byte per weight; block-wise checkpoints add one fp32 scale per 128x128 tile.
            return params + (4 * params // (128 * 128) if self.block_scales else 0)
        # AWQ/GPTQ: packed `bits`-bit weights plus, per group of `group_size` weights, an fp16 scale and
        # a zero point packed at the same bit width (qzeros). GPTQ's g_idx (one int32 per input row) is
        # below 0.1% and ignored. group_size -1 (GPTQ per-channel) has one scale per output row: ignored.
        if self.group_size <= 0:
            return math.ceil(params * self.bits / 8)
        per_group = self.group_size * self.bits / 8 + 2 + self.bits / 8
        return math.ceil(params / self.group_size * per_group)


QUANT_CHOICES = ("none", "bf16", "fp16", "fp8", "awq", "gptq")


def quant_scheme(name: str | None, spec: ModelSpec) -> QuantScheme:
    """The scheme for a --quantization value; None means: whatever the checkpoint's config says."""
    if name is None:
        return spec.checkpoint_quant or QuantScheme("none")
    if name in ("none", "bf16", "fp16"):
        return QuantScheme("none")
    if name == "fp8":
        return QuantScheme(
            "fp8", bits=8, block_scales=bool(spec.checkpoint_quant and spec.checkpoint_quant.block_scales)
        )
    if name in ("awq", "gptq"):
        ckpt = spec.checkpoint_quant
        if ckpt is not None and ckpt.method == name:
            return ckpt
        return QuantScheme(name, bits=4, group_size=128)
    raise PlanError(f"unknown quantization {name!r} (choose from {', '.join(QUANT_CHOICES)})")


@dataclass(frozen=True)
class ModelSpec:
    """What the memory math needs from a config.json."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str
    qkv_bias: bool = False
    mlp_bias: bool = False
    norms_per_layer: int = 2
    sliding_window: int | None = None
    sliding_layers: int = 0  # layers that attend only to the last `sliding_window` tokens
    # Mixture of experts (DeepSeek / Mixtral style); 0 experts = dense.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    moe_intermediate_size: int = 0
    first_k_dense: int = 0
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank None = ordinary (GQA) attention.
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    checkpoint_quant: QuantScheme | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def full_layers(self) -> int:
        return self.num_layers - self.sliding_layers


def _req(cfg: Mapping[str, Any], key: str, source: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        got = "missing" if value is None else f"got {value!r}"
        raise PlanError(f"{source}: field {key!r} must be a positive integer ({got})")
    return value


def _opt(cfg: Mapping[str, Any], key: str, source: str, default: int = 0) -> int:
    """An optional non-negative integer field (null/absent = default)."""
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlanError(f"{source}: field {key!r} must be a non-negative integer (got {value!r})")
    return value


def _checkpoint_quant(cfg: Mapping[str, Any], source: str) -> QuantScheme | None:
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        return QuantScheme("fp8", bits=8, block_scales=qc.get("weight_block_size") is not None)
    if method in ("awq", "gptq"):
        bits, group = qc.get("bits", 4), qc.get("group_size", 128)
        if not isinstance(bits, int) or not isinstance(group, int) or bits not in (2, 3, 4, 8):
            raise PlanError(f"{source}: quantization_config needs integer bits (2/3/4/8) and group_size")
        return QuantScheme(method, bits=bits, group_size=group)
    raise PlanError(f"{source}: quantization_config.quant_method {method!r} is not supported by the planner")


def spec_from_config(cfg: Mapping[str, Any], name: str, source: str = "config.json") -> ModelSpec:
    """Build a ModelSpec from a HF config.json mapping; missing or invalid fields raise PlanError."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config")}
    model_type = str(cfg.get("model_type", "unknown"))
    layers = _req(cfg, "num_hidden_layers", source)
    heads = _req(cfg, "num_attention_heads", source)
    hidden = _req(cfg, "hidden_size", source)
    kv_heads = _opt(cfg, "num_key_value_heads", source) or heads
    head_dim = _opt(cfg, "head_dim", source) or hidden // heads
    window = _opt(cfg, "sliding_window", source) if cfg.get("use_sliding_window", True) is not False else 0
    sliding = 0
    if isinstance(cfg.get("layer_types"), list):
        sliding = sum(1 for t in cfg["layer_types"] if t == "sliding_attention")
    elif window:
        # Gemma 2 alternates local (sliding) and global layers; Mistral v0.1-style configs slide everywhere.
        sliding = layers // 2 + layers % 2 if model_type == "gemma2" else layers
    if sliding and not window:
        raise PlanError(f"{source}: layer_types has sliding layers but sliding_window is missing")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    spec = ModelSpec(
        name=name,
        model_type=model_type,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_req(cfg, "intermediate_size", source),
        vocab_size=_req(cfg, "vocab_size", source),
        max_position_embeddings=_req(cfg, "max_position_embeddings", source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        dtype=_DTYPE_ALIASES.get(dtype, dtype),
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        norms_per_layer=4 if model_type in ("gemma2", "gemma3") else 2,
        sliding_window=window if sliding else None,
        sliding_layers=sliding,
        n_routed_experts=_opt(cfg, "n_routed_experts", source) or _opt(cfg, "num_local_experts", source),
        n_shared_experts=_opt(cfg, "n_shared_experts", source),
        moe_intermediate_size=_opt(cfg, "moe_intermediate_size", source) or _opt(cfg, "intermediate_size", source),
        first_k_dense=_opt(cfg, "first_k_dense_replace", source),
        kv_lora_rank=_opt(cfg, "kv_lora_rank", source) or None,
        q_lora_rank=_opt(cfg, "q_lora_rank", source) or None,
        qk_nope_head_dim=_opt(cfg, "qk_nope_head_dim", source),
        qk_rope_head_dim=_opt(cfg, "qk_rope_head_dim", source),
        v_head_dim=_opt(cfg, "v_head_dim", source),
        checkpoint_quant=_checkpoint_quant(cfg, source),
    )
    dtype_bytes(spec.dtype)  # reject unknown dtypes early
    return spec


@dataclass(frozen=True)
class ParamCounts:
    embedding: int
    lm_head: int
    linear: int  # decoder projections and experts: what weight quantization compresses
    other: int  # norms, biases, MoE routers: kept in the model dtype

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.linear + self.other


def _attention_params(s: ModelSpec) -> tuple[int, int]:
    """(linear, other) parameters of one attention block."""
    h = s.hidden_size
    if s.is_mla:
        rank = s.kv_lora_rank or 0
        qk = s.qk_nope_head_dim + s.qk_rope_head_dim
        q = h * s.q_lora_rank + s.q_lora_rank * s.num_heads * qk if s.q_lora_rank else h * s.num_heads * qk
        kv = h * (rank + s.qk_rope_head_dim) + rank * s.num_heads * (s.qk_nope_head_dim + s.v_head_dim)
        o = s.num_heads * s.v_head_dim * h
        return q + kv + o, rank + (s.q_lora_rank or 0)  # other = the two latent layernorms
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    linear = h * q_out + 2 * h * kv_out + q_out * h
    return linear, (q_out + 2 * kv_out if s.qkv_bias else 0)


def _mlp_params(s: ModelSpec, layer: int) -> tuple[int, int]:
    """(linear, other) parameters of one gated MLP (gate, up, down) or MoE block."""
    h = s.hidden_size
    if s.n_routed_experts and layer >= s.first_k_dense:
        experts = (s.n_routed_experts + s.n_shared_experts) * 3 * h * s.moe_intermediate_size
        router = s.n_routed_experts * h + (s.n_routed_experts if s.model_type == "deepseek_v3" else 0)
        return experts, router
    bias = 2 * s.intermediate_size + h if s.mlp_bias else 0
    return 3 * h * s.intermediate_size, bias


def count_params(s: ModelSpec) -> ParamCounts:
    """Parameters from the config: embeddings, attention (GQA or MLA), gated MLP / MoE, norms, lm_head."""
    attn_linear, attn_other = _attention_params(s)
    linear = attn_linear * s.num_layers
    other = (attn_other + s.norms_per_layer * s.hidden_size) * s.num_layers + s.hidden_size  # + final norm
    for layer in range(s.num_layers):
        mlp_linear, mlp_other = _mlp_params(s, layer)
        linear += mlp_linear
        other += mlp_other
    embedding = s.vocab_size * s.hidden_size
    return ParamCounts(embedding, 0 if s.tie_word_embeddings else embedding, linear, other)


def weights_bytes(s: ModelSpec, quant: QuantScheme, dtype: str | None = None) -> int:
    """Bytes of all weights of the model (all TP ranks together)."""
    counts = count_params(s)
    nbytes = dtype_bytes(dtype or s.dtype)
    if nbytes == 4 and quant.method != "none":
        nbytes = 2  # quantized checkpoints run their unquantized tensors in 16-bit
    kept = (counts.embedding + counts.lm_head + counts.other) * nbytes
    return kept + quant.linear_bytes(counts.linear, nbytes)


# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    source: str
    published_params: float | None = None
    hf_id: str | None = None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise PlanError(f"{path}: cannot read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: invalid JSON: {err.msg} at line {err.lineno}") from None


def data_json(name: str) -> Any:
    """A bundled JSON file from serve_app/data."""
    return json.loads(resources.files("serve_app").joinpath("data").joinpath(name).read_text())


def preset_names() -> list[str]:
    return sorted(k for k in data_json("models.json") if not k.startswith("_"))


def load_model(name_or_path: str) -> ModelSource:
    """A preset name (case-insensitive), a HF checkpoint folder, or a path to its config.json."""
    presets = data_json("models.json")
    key = name_or_path.lower()
    if key in presets and not key.startswith("_"):
        entry = presets[key]
        spec = spec_from_config(entry["config"], key, f"preset {key}")
        return ModelSource(spec, f"preset {key}", entry.get("published_params"), entry.get("hf_id"))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(
            f"unknown model {name_or_path!r}: not a preset ({', '.join(preset_names())}) "
            "nor a checkpoint folder / config.json path"
        )
    cfg = _load_json(path)
    if not isinstance(cfg, dict):
        raise PlanError(f"{path}: expected a JSON object")
    return ModelSource(spec_from_config(cfg, path.parent.name or str(path), str(path)), str(path))


# -------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_bytes: int


def gpu_table() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = data_json("gpus.json")["gpus"]
    return table


def load_gpu(name: str, memory_gib: float | None = None) -> GpuSpec:
    """A GPU from the bundled table by name or alias (case-insensitive); memory_gib overrides its memory."""
    if memory_gib is not None and memory_gib <= 0:
        raise PlanError(f"--gpu-memory-gib must be positive (got {memory_gib})")
    for key, entry in gpu_table().items():
        if name.lower() in [key.lower(), *(a.lower() for a in entry.get("aliases", []))]:
            mem = int(memory_gib * GiB) if memory_gib is not None else int(entry["memory_mib"]) * MiB
            return GpuSpec(key, mem)
    if memory_gib is not None:
        return GpuSpec(name, int(memory_gib * GiB))
    raise PlanError(f"unknown GPU {name!r} (known: {', '.join(gpu_table())}; or pass --gpu-memory-gib)")
