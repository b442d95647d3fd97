"""Elementwise loss functions with torch semantics, computed by optax.

Each result keeps its input's floating dtype (no promotion to float64 under
`jax_enable_x64` for float32 inputs).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def smooth_l1(x, beta: float):
    """torch `smooth_l1_loss` without reduction: 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta.

    That is `optax.huber_loss(x, delta=beta) / beta` (gradient x / beta inside, sign(x)
    outside); beta = 0 is the L1 loss |x|, as in torch.
    """
    beta = float(beta)  # a Python float is weakly typed: x's dtype is kept
    if beta == 0:
        # |x| with torch's gradient sign(x), 0 at x = 0 (jnp.abs has gradient 1 there).
        return x * jnp.sign(x)
    return optax.huber_loss(x, delta=beta) / beta


def sigmoid_binary_cross_entropy(logits, targets):
    """torch `binary_cross_entropy_with_logits` without reduction (numerically stable), in the logits' dtype."""
    return optax.sigmoid_binary_cross_entropy(logits, targets)


def softmax_cross_entropy(logits, labels):
    """torch `cross_entropy` without reduction: logits [..., C], labels [...] int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
