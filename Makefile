# Two commands do all the set-up on a fresh machine (the README starts with them):
#   make bench   the benchmark suite on the default device, prints a table
#   make test    the test suite (what CI runs)
# Both create .venv and install torch first, then this package with the extras they need:
# `bench` installs [bench] (no triton: ~1 GB that only the interpreter tests and GPUs use),
# `test` installs [dev] (everything, triton included).
#
# Which torch: a bare `torch` requirement resolves to the CUDA build on Linux (~18 NVIDIA
# packages, several GB). On a machine without an NVIDIA driver (no `nvidia-smi` on PATH and no
# /proc/driver/nvidia) torch comes from PyTorch's CPU wheel index; when that index cannot be
# reached the attempt gives up within seconds (--timeout 5 --retries 0) and the default index
# is used instead. With a driver, the default index (the CUDA build). Override with
# `make TORCH_INDEX= ...` (always the default index) or TORCH_INDEX=<url>.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PIP    := $(PY) -m pip install --quiet
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 || test -e /proc/driver/nvidia && echo yes)
TORCH_INDEX ?= $(if $(HAS_NVIDIA),,https://download.pytorch.org/whl/cpu)
TORCH_STAMP := $(VENV)/.torch
BENCH_STAMP := $(VENV)/.installed-bench
DEV_STAMP   := $(VENV)/.installed-dev
SERVE_STAMP := $(VENV)/.installed-serve
RAY_STAMP   := $(VENV)/.installed-ray
# pytest's summary lists every skip with its reason (-rs); CI logs must show what did not run
PYTEST := $(PY) -m pytest -q -rs

.PHONY: setup test bench bench-full lint clean gpu-check serve-demo serve-demo-ray

$(TORCH_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ]; then \
	  echo "installing $(TORCH) from $(TORCH_INDEX) (no NVIDIA driver found)"; \
	  $(PIP) --timeout 5 --retries 0 --index-url "$(TORCH_INDEX)" "$(TORCH)" \
	  || { echo "note: $(TORCH_INDEX) unreachable or without $(TORCH);" \
	            "installing $(TORCH) from the default index"; \
	       $(PIP) "$(TORCH)"; }; \
	else \
	  echo "installing $(TORCH) from the default index"; \
	  $(PIP) "$(TORCH)"; \
	fi
	touch $@

$(BENCH_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) -e ".[bench]"
	touch $@

$(SERVE_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) -e ".[serve]"
	touch $@

$(RAY_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) -e ".[ray]"
	touch $@ $(SERVE_STAMP)

$(DEV_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) -e ".[dev]"
	touch $@ $(BENCH_STAMP) $(SERVE_STAMP) $(RAY_STAMP)

setup: $(DEV_STAMP)

test: $(DEV_STAMP)
	$(PYTEST)
	$(PYTEST) benchmarks --benchmark-disable -p no:cacheprovider || test $$? -eq 5

bench: $(BENCH_STAMP)
	$(VENV)/bin/lorakernels bench --quick

bench-full: $(BENCH_STAMP)
	$(VENV)/bin/lorakernels bench --full

# The A1111-compatible server on a tiny random-weight pipeline and 4 generated LoRAs
# (built locally, no downloads), on 127.0.0.1:7860 until Ctrl-C
serve-demo: $(SERVE_STAMP)
	$(VENV)/bin/lorakernels serve --demo

# The same behind Ray Serve: a local cluster, 2 replicas, adapter-affinity routing
serve-demo-ray: $(RAY_STAMP)
	$(VENV)/bin/lorakernels serve --demo --ray --replicas 2

# On a GPU machine (torch + triton there, nothing downloadable): the one command of
# benchmarks/GPU.md. Runs from this checkout with .venv's python if there is one, else the
# python already installed; the script path (not -m) answers even where torch is missing.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) lorakernels/gpu_check.py --out gpu-results

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
