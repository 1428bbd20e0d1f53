# The two commands of the README:
#   make quickstart   set up, then pretrain a tiny GLM on the bundled corpus (CPU, a few minutes)
#   make test         set up, then run the test suite (what .ci/run calls)
# Set-up is idempotent: a virtual environment in .venv with torch==2.13.0 installed first (so pip
# never pulls a CUDA build), then this package with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test quickstart lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

quickstart: setup
	PATH=$(abspath $(VENV))/bin:$$PATH bash examples/quickstart.sh

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
