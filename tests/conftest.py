"""Test setup: CPU JAX with 8 simulated devices, torch/shared-data availability policy.

FRCNN_TEST_X64=1 turns `jax_enable_x64` on before any JAX use (tests/test_ops_x64.py
runs the op parity tests that way, in a subprocess: the setting is process-wide).

Outside CI a missing optional dependency (torch) or missing ../shared data skips the
tests that need it, with a message; in CI (CI=true) they fail instead, so a broken CI
environment can never pass by skipping.
"""

from __future__ import annotations

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import importlib
import pathlib

import jax
import pytest
from absl import flags

# grain's worker processes (num_workers > 0) read absl flags; the suite runs outside absl.app.run.
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]

if os.environ.get("FRCNN_TEST_X64", "").lower() not in ("", "0", "false", "no"):
    jax.config.update("jax_enable_x64", True)

# Many tests compile the same programs (a model per test, train/resume runs of one
# config): share compiled executables across them through JAX's persistent cache.
# The command-line tools the tests run as subprocesses (train.py, eval.py, predict) use
# the same cache, not the user's ~/.cache/frcnn_jax.
_TEST_CACHE = os.environ.get("FRCNN_TEST_XLA_CACHE", str(REPO / ".pytest_cache" / "xla"))
jax.config.update("jax_compilation_cache_dir", _TEST_CACHE)
os.environ["FRCNN_JAX_CACHE_DIR"] = _TEST_CACHE
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def pytest_report_header(config):
    return f"jax_enable_x64: {jax.config.read('jax_enable_x64')}"


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.x64` tests (float64 inputs) exist only with jax_enable_x64 on: without it they
    are deselected, not skipped (tests/test_ops_x64.py runs them in an x64 subprocess)."""
    if jax.config.read("jax_enable_x64"):
        return
    x64_only = [item for item in items if item.get_closest_marker("x64")]
    if x64_only:
        config.hook.pytest_deselected(items=x64_only)
        items[:] = [item for item in items if not item.get_closest_marker("x64")]


def _unavailable(message: str):
    if in_ci():
        pytest.fail(f"{message} (CI=true: required in CI, failing instead of skipping)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def torch():
    """The torch module; fails in CI and skips elsewhere when the torch extra is missing."""
    try:
        mod = importlib.import_module("torch")
        importlib.import_module("torchvision")
    except ImportError as e:  # pragma: no cover - depends on the environment
        _unavailable(f"torch/torchvision not installed ({e}); install the extra: pip install -e '.[torch]'")
    mod.set_num_threads(2)
    return mod


@pytest.fixture(scope="session")
def torchvision(torch):
    return importlib.import_module("torchvision")


def shared_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FRCNN_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared():
    """Path of ../shared (real data for tests); fails in CI and skips elsewhere when missing."""
    path = shared_dir()
    if not (path / "data").is_dir():
        _unavailable(f"shared test data not found at {path} (set FRCNN_SHARED)")
    return path
