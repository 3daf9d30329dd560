# Two commands on a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin

.PHONY: demo test lint types unit bench deps clean

deps: $(VENV)/.installed node_modules/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

## Start the local Azure stack, run a real job end to end as a Container Apps job would, show the results.
demo: deps
	$(PY) -m scripts.demo

## Lint, types and the whole test suite.
test: deps lint types unit

lint:
	$(BIN)/ruff check worker tests scripts
	$(BIN)/ruff format --check worker tests scripts
	$(BIN)/hadolint Dockerfile

types:
	$(BIN)/mypy

unit:
	$(BIN)/pytest --cov --cov-report=term:skip-covered

## Throughput, quota utilisation and memory, against the local fakes.
bench: deps
	$(PY) -m scripts.bench

clean:
	rm -rf $(VENV) node_modules .stack .demo .bench .pytest_cache .mypy_cache .ruff_cache
