# Developer entry points. Everything runs from the project venv (.venv), which is
# (re)built only when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: venv demo test bench lint down

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/conclave dev up
	$(BIN)/conclave demo

test: venv
	tests/ensure-chromium.sh
	$(BIN)/python -m pytest -q

# The peer baselines (Dramatiq, Celery) need the `bench` extra; `make test` never does.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

down: venv
	$(BIN)/conclave dev down
