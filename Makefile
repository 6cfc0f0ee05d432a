# The two set-up commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv and install into it; torch comes from `pip install torch==2.13.0`, the CPU build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: demo test install install-test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

install-test: install
	$(BIN)/pip install -q -e '.[test]'

demo: install
	$(BIN)/lmlab demo

test: install-test
	$(BIN)/python -m pytest

lint: install-test
	$(BIN)/ruff check lmlab tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
