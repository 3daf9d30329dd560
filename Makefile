# Two commands on a fresh machine: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin

# Dependencies come from hash-locked files, never from pyproject's ranges: the image installs
# requirements/lock.txt, this venv requirements/dev-lock.txt (the same pins plus the dev tools).
LOCK     := requirements/lock.txt
DEV_LOCK := requirements/dev-lock.txt
INSTALL  := -m pip install --quiet --require-hashes --only-binary=:all:
# The platform the lock is resolved for, whichever machine runs `make lock`: the image's.
LOCK_FOR := --python-version 3.11 --python-platform x86_64-manylinux_2_28
COMPILE  := $(BIN)/uv pip compile --quiet --upgrade --generate-hashes --custom-compile-command 'make lock' $(LOCK_FOR)
# $(call compile,ARGS,FILE): FILE is replaced only when its content changes (its date reinstalls the venv).
compile = $(COMPILE) $(1) -o $(2).new && { cmp -s $(2).new $(2) && rm $(2).new || mv $(2).new $(2); }

.PHONY: demo test lint types unit bench deps lock clean

deps: $(VENV)/.installed node_modules/.installed

# A new lock gets a new venv (--clear), so nothing the lock dropped stays installed.
$(VENV)/.installed: $(DEV_LOCK) pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) $(INSTALL) -r $(DEV_LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
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

## Re-resolve every dependency to the newest versions pyproject.toml allows, with hashes; commit the result.
lock: $(VENV)/.installed
	$(call compile,pyproject.toml --extra azure-monitor,$(LOCK))
	$(call compile,pyproject.toml --extra dev -c $(LOCK),$(DEV_LOCK))

## Throughput, quota utilisation and memory, against the local fakes.
bench: deps
	$(PY) -m scripts.bench

clean:
	rm -rf $(VENV) node_modules .stack .demo .bench .pytest_cache .mypy_cache .ruff_cache
