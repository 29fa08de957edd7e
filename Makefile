# The two commands of the README: `make demo` (install + serve the bundled model with the Mesa
# backend and answer a long-prompt request) and `make test` (the whole test suite + lint).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/mesa-vllm demo

test: setup
	$(PY) -m pytest -q -rs tests
	$(MAKE) lint

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
