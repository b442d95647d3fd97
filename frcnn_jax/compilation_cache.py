"""JAX's persistent compilation cache for the command-line tools.

Compiling a detector takes tens of seconds on CPU; `train.py`, `eval.py` and `predict`
reuse compiled programs across runs (a resumed run starts at once) by caching them in
$FRCNN_JAX_CACHE_DIR (default ~/.cache/frcnn_jax/xla). Set FRCNN_JAX_CACHE_DIR="" to
disable; an explicitly configured `jax_compilation_cache_dir` is left alone. Library
imports never change JAX's configuration: only the CLIs call `enable()`.

Multi-process runs on CPU compile afresh: with jax 0.12.1, a program whose cross-process
collectives (gloo) were loaded from the cache hung in its first step (both processes waiting
on the step's result), where the same program compiled afresh ran.
"""

from __future__ import annotations

import os

import jax


def enable() -> str | None:
    """Turns the cache on (unless disabled or already configured); returns its directory.

    Call it after `jax.distributed.initialize` (training.sharding.initialize_distributed):
    in a multi-process CPU run it turns JAX's cache off instead and returns None.
    """
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
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
