"""The practical limit for streaming: a bare FastAPI/uvicorn SSE server emitting the same stream.

It runs serve_app's simulated engine in-process (same chunks, same timing model) and writes its chunks
straight to the HTTP response: no Ray proxy, no gateway, no replica hop.

    python -m bench.sse_baseline --port N --pools-json '{"<model>": {"engine": "simulated", ...}, ...}'
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serve_app.config import PoolConfig
from serve_app.engines.simulated import SimulatedEngine
from serve_app.protocol import DONE, ChunkReply, ErrorReply, JSONReply, Reply


def build(pools: dict[str, PoolConfig]) -> FastAPI:
    app = FastAPI()
    engines = {name: SimulatedEngine(name, pool) for name, pool in pools.items()}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: dict[str, Any] = await request.json()
        engine = engines.get(str(body.get("model")))
        if engine is None:
            return JSONResponse({"error": {"message": "unknown model"}}, status_code=404)
        gen = engine.chat(body, "baseline")
        first = await gen.__anext__()
        if isinstance(first, ErrorReply):
            return JSONResponse(first.body, status_code=first.status)
        if isinstance(first, JSONReply):
            return JSONResponse(first.body)

        async def stream() -> AsyncIterator[str]:
            item: Reply = first
            while True:
                if isinstance(item, ChunkReply) and not item.usage_only and item.data:
                    yield item.data
                try:
                    item = await gen.__anext__()
                except StopAsyncIteration:
                    break
            yield DONE

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pools-json", required=True, help="model name -> simulated PoolConfig, as JSON")
    args = p.parse_args()
    pools = {k: PoolConfig.model_validate(v) for k, v in json.loads(args.pools_json).items()}
    uvicorn.run(build(pools), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
