# lmpipe: `make run` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create the virtual environment first if it is missing (or out of date with the lock file).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and alone, from TORCH_INDEX_URL when it is set, so the build is the one
# asked for: https://download.pytorch.org/whl/cpu for CPU only (no CUDA wheels, ~200 MB instead of
# several GB), .../whl/cu126 or another CUDA variant for GPUs. Empty: pip's configured index (PyPI's
# Linux wheel is the CUDA build; a machine with a local CPU wheel configured gets that one).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/python -m pip install --progress-bar on

export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONUNBUFFERED := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test test-fast lint bench clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@py=$(BIN)/python; test -x $$py || py=$(PYTHON); \
	$$py -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "lmpipe needs Python >= 3.11, but $$py is $$($$py -V 2>&1 || echo missing)." >&2; \
	  echo "Run: make setup PYTHON=python3.11 (or a newer one); remove $(VENV) first if it was made by the old one." >&2; \
	  exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing $(TORCH_SPEC) from $(or $(TORCH_INDEX_URL),pip's configured index)"
	$(PIP_INSTALL) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH_SPEC)
	@echo "== installing lmpipe and its dependencies, pinned by requirements.lock (a few minutes the first time)"
	$(PIP_INSTALL) -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/lmpipe run

test: setup
	$(BIN)/ruff check src tests pipelines benchmarks infra
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests pipelines benchmarks infra
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/clean_throughput.py
	$(BIN)/python benchmarks/tokenize_throughput.py
	$(BIN)/python benchmarks/pretrain_throughput.py

clean-outputs:
	rm -rf data artifacts models reports plots metrics
