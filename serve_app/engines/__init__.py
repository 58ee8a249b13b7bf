"""Engines behind the LLMServer replica interface: `vllm` (real) and `simulated` (test double)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve_app.engines.base import Engine

if TYPE_CHECKING:
    from serve_app.config import PoolConfig


def create_engine(pool_name: str, pool: PoolConfig) -> Engine:
    """Build the engine a pool asks for. Only the vllm kind imports vllm (lazily)."""
    if pool.engine == "simulated":
        from serve_app.engines.simulated import SimulatedEngine

        return SimulatedEngine(pool_name, pool)
    from serve_app.engines.vllm import VLLMEngine

    return VLLMEngine(pool_name, pool)


__all__ = ["Engine", "create_engine"]
