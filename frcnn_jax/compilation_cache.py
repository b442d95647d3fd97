"""JAX's persistent compilation cache for the command-line tools.

Compiling a detector takes tens of seconds on CPU; `train.py`, `eval.py` and `predict`
reuse compiled programs across runs (a resumed run starts at once) by caching them in
$FRCNN_JAX_CACHE_DIR (default ~/.cache/frcnn_jax/xla). Set FRCNN_JAX_CACHE_DIR="" to
disable; an explicitly configured `jax_compilation_cache_dir` is left alone. Library
imports never change JAX's configuration: only the CLIs call `enable()`.
"""

from __future__ import annotations

import os

import jax


def enable() -> str | None:
    """Turns the cache on (unless disabled or already configured); returns its directory."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    directory = os.environ.get(
        "FRCNN_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "frcnn_jax", "xla")
    )
    if not directory:
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    return directory
