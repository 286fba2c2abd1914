# Two commands do all the set-up on a fresh machine (the README starts with them):
#   make bench   the benchmark suite on the default device, prints a table
#   make test    the test suite (what CI runs)
# Both create .venv, install torch's CPU build first (a bare `torch` requirement would pull a
# multi-GB CUDA build), then this package with its extras.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup test bench bench-full lint clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m pytest -q benchmarks --benchmark-disable -p no:cacheprovider || test $$? -eq 5

bench: $(STAMP)
	$(VENV)/bin/lorakernels bench --quick

bench-full: $(STAMP)
	$(VENV)/bin/lorakernels bench --full

# On a GPU machine (torch + triton there, nothing downloadable): the one command of
# benchmarks/GPU.md. Runs from this checkout with .venv's python if there is one, else the
# python already installed; the script path (not -m) answers even where torch is missing.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PY) lorakernels/gpu_check.py --out gpu-results

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
