"""Argument checks shared by the ops.

Every check runs at trace time on static information (ranks, shapes, Python
numbers). Value checks (finite boxes) run only when the array is concrete, i.e.
when the op is called eagerly; inside `jax.jit` the values are unknown.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def check_rank(name: str, x, rank: int | tuple[int, ...], last_dim: int | None = None):
    """Raises ValueError unless `x.ndim` is `rank` (or one of them) and x.shape[-1] == last_dim."""
    ranks = (rank,) if isinstance(rank, int) else rank
    ndim = np.ndim(x)
    if ndim not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{name} must have rank {want}, got shape {np.shape(x)}")
    if last_dim is not None and np.shape(x)[-1] != last_dim:
        raise ValueError(f"{name} must have last dimension {last_dim}, got shape {np.shape(x)}")


def check_float(name: str, x):
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array (float32, bfloat16; float64 under x64), got {dtype}")


def check_same_leading(names: tuple[str, str], a, b):
    if np.shape(a)[0] != np.shape(b)[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of rows, got {np.shape(a)} and {np.shape(b)}"
        )


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_finite_boxes(name: str, boxes):
    """Raises ValueError for NaN/inf coordinates when `boxes` is concrete (eager call)."""
    if not is_concrete(boxes):
        return
    arr = np.asarray(boxes, dtype=np.float64)  # exact for every float input
    if arr.size and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr).all(axis=-1))[0]
        raise ValueError(f"{name} must be finite; row {tuple(int(i) for i in bad)} is {arr[tuple(bad)]}")


def check_number(name: str, value, *, minimum=None, maximum=None, integer=False, allow_traced=True):
    """Checks a scalar argument. Traced values are accepted as they are (no value check)."""
    if isinstance(value, jax.core.Tracer):
        if not allow_traced:
            raise ValueError(f"{name} must be a static Python number, got a traced value")
        return
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = value.item()
    if integer:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value!r}")
