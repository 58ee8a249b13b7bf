"""Benchmark harness for serve_app (see bench/README.md). Run scenarios with `python -m bench.<scenario>`."""
