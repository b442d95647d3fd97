# `make train`: set up a local virtual environment and train the default model (main job).
# `make test`:  set up the environments and run the tests: lint, the whole suite on the newest
#               releases the ranges allow, a selection on the lowest ones, the accelerator smoke
#               in the GPU machine's package set (what CI runs: .ci/run).
# Python >= 3.12 is required (jax >= 0.11 needs it): scripts/find-python finds one, or pass PYTHON=...
PYTHON ?= $(shell sh scripts/find-python)
VENV ?= .venv
PY := $(VENV)/bin/python
# The other end of the declared ranges, and the GPU machine's package set (.ci/*.txt).
LOWEST_VENV ?= .venv-lowest
GPU_VENV ?= .venv-gpu-machine
WORKDIR ?= runs/shapes
# pytest-xdist workers for `make test` (each test file runs whole on one worker).
TEST_WORKERS ?= 2
# What the lowest versions must pass: op parity, detector parity, exact resume (a mask model), export.
LOWEST_TESTS ?= tests/test_boxes.py tests/test_anchors.py tests/test_nms.py tests/test_roi_align.py \
  tests/test_ops_x64.py tests/test_detector_parity.py tests/test_export.py \
  tests/test_train_resilience.py::test_kill_9_at_random_moments_then_the_same_command_resumes_exactly

.PHONY: install install-dev train lint test test-newest test-lowest test-accelerator-env bench clean

define make_venv
	@test -n "$(PYTHON)" || { echo "error: no Python >= 3.12 (see scripts/find-python)" >&2; exit 1; }
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
endef

# A venv left by an older Python (< 3.12) is refused with the way out, not reused.
define check_venv
	@$(1)/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 12))' || \
	  { echo "error: $(1) runs Python < 3.12; remove it (make clean) and rerun" >&2; exit 1; }
endef

$(VENV)/bin/python:
	$(call make_venv,$(VENV))

# Runtime only (what `make train` needs).
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(call check_venv,$(VENV))
	$(PY) -m pip install -q -e .
	touch $@

# Runtime + torch (parity reference, checkpoint import) + test tools, newest allowed versions.
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(call check_venv,$(VENV))
	$(PY) -m pip install -q --upgrade --upgrade-strategy eager -e '.[torch,dev]'
	touch $(VENV)/.installed $@

$(LOWEST_VENV)/.installed-dev: pyproject.toml .ci/lowest-constraints.txt
	$(call make_venv,$(LOWEST_VENV))
	$(LOWEST_VENV)/bin/python -m pip install -q -c .ci/lowest-constraints.txt -e '.[torch,dev]'
	touch $@

$(GPU_VENV)/.installed: .ci/gpu-machine-requirements.txt
	$(call make_venv,$(GPU_VENV))
	$(GPU_VENV)/bin/python -m pip install -q -r .ci/gpu-machine-requirements.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

train: install
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) train.py --workdir $(WORKDIR)

# ruff (configured in pyproject.toml: lint rules, line length 120) must be clean.
lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint test-newest test-lowest

# The whole suite on the newest versions. Its accelerator smoke test runs benchmarks/accelerator.py
# in the GPU machine's package set (jax 0.11.2, flax, optax, orbax-checkpoint, numpy only).
test-newest: install-dev $(GPU_VENV)/.installed
	$(PY) -c 'import jax, flax, optax, orbax.checkpoint as o, torch; print("newest:", "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)'
	FRCNN_ACCELERATOR_PYTHON=$(abspath $(GPU_VENV))/bin/python JAX_PLATFORMS=cpu \
	  $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

test-lowest: $(LOWEST_VENV)/.installed-dev
	$(LOWEST_VENV)/bin/python -c 'import jax, flax, optax, numpy; print("lowest:", "jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "numpy", numpy.__version__)'
	JAX_PLATFORMS=cpu FRCNN_TEST_XLA_CACHE=$(abspath .pytest_cache/xla-lowest) \
	  $(LOWEST_VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(LOWEST_TESTS)

# The accelerator smoke alone, in the GPU machine's package set.
test-accelerator-env: install-dev $(GPU_VENV)/.installed
	FRCNN_ACCELERATOR_PYTHON=$(abspath $(GPU_VENV))/bin/python JAX_PLATFORMS=cpu \
	  $(PY) -m pytest tests/test_benchmarks.py -k accelerator_smoke

bench: install-dev
	JAX_PLATFORMS=cpu $(PY) benchmarks/ops.py

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(GPU_VENV) .pytest_cache
