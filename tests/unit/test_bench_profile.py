"""bench/profile.py: py-spy raw (collapsed) stacks -> self/total/layer shares."""

from __future__ import annotations

import pytest

from bench.profile import layer_of, summarize

SP = "/v/lib/python3.11/site-packages"
PICKLE = f"{SP}/ray/cloudpickle/cloudpickle.py:1"
RAW = "\n".join(
    [
        "run (asyncio/base_events.py:1);_chunk (/work/main/serve_app/dispatch.py:80);loads (json/decoder.py:9) 30",
        f"run (asyncio/base_events.py:1);send ({SP}/starlette/responses.py:250) 20",
        f"run (asyncio/base_events.py:1);_next ({SP}/ray/_raylet.pyx:1);dumps ({PICKLE}) 40",
        "run (asyncio/base_events.py:1);select (selectors.py:468) 10",
    ]
)


@pytest.mark.parametrize(
    ("frames", "layer"),
    [
        (
            ["run (asyncio/base_events.py:1)", "f (/x/serve_app/gateway.py:1)", "loads (json/decoder.py:9)"],
            "serve_app (our code)",
        ),
        ([f"g ({SP}/ray/_raylet.pyx:1)", f"dumps ({SP}/ray/cloudpickle/cloudpickle.py:1)"], "pickling / serialization"),
        ([f"h ({SP}/ray/serve/_private/proxy.py:1)"], "Ray Serve (proxy, router, replica, handle)"),
        (["main (x.py:1)"], "other (stdlib, C extensions)"),
    ],
)
def test_layer_of_charges_the_innermost_known_frame(frames: list[str], layer: str) -> None:
    assert layer_of(frames) == layer


def test_summarize_counts_self_total_and_layers() -> None:
    s = summarize(RAW, rate=100)
    assert s["samples"] == 100 and s["cpu_s"] == 1.0
    layers = {k: v for k, v, _ in s["layers"]}
    assert layers == {
        "pickling / serialization": 40,
        "serve_app (our code)": 30,
        "Starlette / FastAPI / uvicorn (ASGI, HTTP)": 20,
        "asyncio / event loop": 10,
    }
    assert s["self"][0][0] == "dumps (ray/cloudpickle/cloudpickle.py:1)" and s["self"][0][1] == 40
    assert s["total"][0] == ("run (asyncio/base_events.py:1)", 100, 1.0)
