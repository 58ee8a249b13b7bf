"""The Ray Serve LLM anchor: `ray.serve.llm.build_openai_app` with the same model and engine flags.

Started by bench/overhead.py as its own process; prints "rayllm is ready" when deployed and stops on
SIGTERM/SIGINT. Ray gets 8 logical CPUs on this 2-core machine (every deployment asks for 1 CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model-id", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kv-gib", default="2")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--compilation-config", default="{}", help="JSON, as vllm serve's --compilation-config")
    args = p.parse_args()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = args.kv_gib

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    # address="local": a fresh cluster of our own, never one another process started with `ray start`.
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    cfg = LLMConfig(
        model_loading_config={"model_id": args.model_id, "model_source": args.model_dir},
        engine_kwargs={
            "dtype": args.dtype,
            "enforce_eager": True,
            "max_model_len": args.max_model_len,
            "compilation_config": json.loads(args.compilation_config),
        },
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        # The default bundle asks for a GPU; on a CPU-only machine the engine's bundle is one CPU.
        placement_group_config={"bundles": [{"CPU": 1}]},
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": args.kv_gib}},
    )
    serve.run(build_openai_app({"llm_configs": [cfg]}), name="rayllm", route_prefix="/")
    print("rayllm is ready", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()


if __name__ == "__main__":
    main()
