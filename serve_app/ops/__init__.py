"""Operator tools: capacity plan, cost report, load trace, local Prometheus, model preparation.

Nothing on the request path imports from here except the engine adapter (model_prep, for the local
SmolLM2 checkpoint).
"""
