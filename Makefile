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

# The tests write bytecode caches even where PYTHONDONTWRITEBYTECODE is set (as in many
# container images): each xdist worker otherwise recompiles and assertion-rewrites every test
# module, about 4 CPU-s per worker per run.
TEST_ENV := env -u PYTHONDONTWRITEBYTECODE

test: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(TEST_ENV) $(PY) -m pytest -q -n 4

test-slow: setup
	$(TEST_ENV) $(PY) -m pytest -q -n 2 -m slow

bench: setup
	$(PY) scripts/bench_data_sparsifier.py
