"""Elementwise loss functions with torch semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_l1(x, beta: float):
    """torch `smooth_l1_loss` without reduction: 0.5 x^2 / beta if |x| < beta else |x| - 0.5 beta."""
    ax = jnp.abs(x)
    if beta == 0:
        return ax
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def sigmoid_binary_cross_entropy(logits, targets):
    """torch `binary_cross_entropy_with_logits` without reduction (numerically stable)."""
    return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def softmax_cross_entropy(logits, labels):
    """torch `cross_entropy` without reduction: logits [..., C], labels [...] int."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
