.PHONY: setup run test test-slow lint bench

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m sparsify_exp sparsifier=first_row data=embeddings

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n 4

test-slow: setup
	$(PY) -m pytest -q -n 2 -m slow

bench: setup
	$(PY) scripts/bench_data_sparsifier.py
