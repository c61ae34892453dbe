# make install / test / lint / demo: the same commands the README and CI use.
PY ?= .venv/bin/python

.PHONY: install test lint format demo

install:
	bash scripts/install.sh

test:
	$(PY) -m pytest

lint:
	$(PY) -m ruff check tunelab tests benchmarks
	$(PY) -m ruff format --check tunelab tests benchmarks

format:
	$(PY) -m ruff check --fix tunelab tests benchmarks
	$(PY) -m ruff format tunelab tests benchmarks

demo:
	.venv/bin/tunelab demo
