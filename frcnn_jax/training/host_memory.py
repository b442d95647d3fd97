"""Host-memory hygiene for the CPU backend: XLA:CPU compile options and glibc's heap."""

from __future__ import annotations

import ctypes
import gc

import jax

from frcnn_jax.modeling import cpu_kernels as cpu_kernels_lib

# `train.xla_cpu_scheduler` -> XLA compile options of the training step on the CPU backend.
# "default" is XLA:CPU's concurrency-optimised scheduler (starts independent work early,
# so more buffers are live at once); "memory" its memory-optimised one. On R-50-FPN at
# 800x1344 "memory" lowers the step's peak from 7.6 to 4.4 GB for ~4 % more time
# (README, "Training step"). Other backends ignore the setting.
CPU_SCHEDULERS = {
    "default": {},
    "memory": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
}


def step_compiler_options(scheduler: str, cpu_kernels: str = "default") -> dict[str, str] | None:
    """The step's `jax.jit(..., compiler_options=...)` on the current backend, or None.

    scheduler: `train.xla_cpu_scheduler`; cpu_kernels: the model's `cpu_kernels`
    (`modeling/cpu_kernels.py`; the model's conv lowering assumes its options).
    """
    if scheduler not in CPU_SCHEDULERS:
        raise ValueError(f"xla_cpu_scheduler={scheduler!r}: must be one of {tuple(CPU_SCHEDULERS)}")
    if jax.default_backend() != "cpu":
        return None
    return {**CPU_SCHEDULERS[scheduler], **cpu_kernels_lib.compiler_options(cpu_kernels)} or None


def release_freed_heap() -> bool:
    """glibc `malloc_trim(0)`: give freed heap pages (e.g. the XLA compiler's) back to the OS.

    After compiling a big program the process keeps the compiler's freed memory mapped,
    counting against the machine's RAM while the step runs. False where it is not glibc.
    """
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def _glibc():
    """The process's glibc (`ctypes.CDLL`), or None where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (glibc's own functions: absent elsewhere)
    except (OSError, AttributeError):
        return None
    return libc


# glibc <malloc.h>: mallopt's parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(megabytes: float) -> bool:
    """glibc `mallopt(M_MMAP_THRESHOLD)`: blocks of at least `megabytes` always come from mmap.

    glibc's threshold starts at 128 KiB and rises to the size of every mmap'd block that
    is freed (up to 32 MiB). After a training step has freed its buffers, the next step's
    therefore come from the heap arenas of whichever threads allocate them, where freed
    blocks fragment and stay resident. Pinning the threshold hands each large buffer back
    to the OS when it is freed: at 1 MiB the Mask R-CNN R-50-FPN step's peak (README,
    "Training step") fell from 5.1-5.4 GB to 4.4-4.55 GB, and to 4.26 from 4.46-4.48 GB
    once its bucket switch was rematerialised, for a few % more time (fresh pages are
    faulted in every step). It is process-wide, so `train_and_evaluate` sets it only
    when `train.malloc_mmap_threshold_mb` asks. False where the C library is not glibc.
    """
    if megabytes <= 0:
        raise ValueError(f"malloc_mmap_threshold_mb={megabytes!r}: must be > 0")
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, int(megabytes * 2**20)))
