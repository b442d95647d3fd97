# `make train`: set up a local virtual environment and train the default model (main job).
# `make test`:  set up the environment (with the torch extra) and run the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/shapes
# pytest-xdist workers for `make test` (each test file runs whole on one worker).
TEST_WORKERS ?= 2

.PHONY: install install-dev train lint test bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Runtime only (what `make train` needs).
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# Runtime + torch (parity reference, checkpoint import) + test tools.
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[torch,dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: install
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --workdir $(WORKDIR)

# ruff (configured in pyproject.toml: lint rules, line length 120) must be clean.
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

bench: install-dev
	JAX_PLATFORMS=cpu $(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) .pytest_cache
