"""Random inputs shared by the op tests and the op benchmarks (numpy only)."""

from __future__ import annotations

import numpy as np


def random_boxes(
    rng: np.random.Generator, n: int, height: float = 800, width: float = 1066, *, min_size=2.0, max_size=600.0
):
    """[n, 4] float32 proposal-like boxes: log-uniform sizes, centres anywhere in the image."""
    wh = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (n, 2)))
    c = rng.uniform([0, 0], [width, height], (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)


def clustered_boxes(rng: np.random.Generator, n: int, height: float = 800, width: float = 1066, clusters: int = 30):
    """[n, 4] float32 boxes jittered around a few objects, like RPN proposals before NMS."""
    centres = rng.uniform([0, 0], [width, height], (clusters, 2))
    sizes = rng.uniform(20, 300, (clusters, 2))
    k = rng.integers(0, clusters, n)
    c = centres[k] + rng.normal(0, 1, (n, 2)) * sizes[k] * 0.15
    s = sizes[k] * np.exp(rng.normal(0, 0.2, (n, 2)))
    return np.concatenate([c - s / 2, c + s / 2], axis=1).astype(np.float32)


def distinct_scores(rng: np.random.Generator, n: int):
    """[n] float32 scores with no ties (a random permutation of a fine grid)."""
    return ((rng.permutation(n) + rng.uniform(0.1, 0.9, n)) / max(n, 1)).astype(np.float32)
