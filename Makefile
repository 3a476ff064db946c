# lmpipe: `make run` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create the virtual environment first if it is missing (or out of date with the lock file).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and alone so that no resolver pulls a CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

export PATH := $(CURDIR)/$(BIN):$(PATH)
export PYTHONUNBUFFERED := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup run test test-fast lint bench clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/python pipelines/flow.py

test: setup
	$(BIN)/ruff check src tests pipelines benchmarks infra
	$(BIN)/python -m pytest -q -p no:cacheprovider

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
