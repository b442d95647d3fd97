"""Balanced positive/negative sampling with a fixed sample count and a JAX PRNG key."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_balanced(key, labels, batch_size_per_image: int, positive_fraction: float):
    """torchvision's `BalancedPositiveNegativeSampler` for one image, with static shapes.

    Args:
      key: PRNG key.
      labels: [N] int: >= 1 positive, 0 negative, < 0 ignored.
      batch_size_per_image: S, the number of samples wanted.
      positive_fraction: at most int(S * fraction) positives; negatives fill up to S.
    Returns:
      (positive [N] bool, negative [N] bool) masks of the chosen samples, uniformly at
      random among the positives / negatives (as torch.randperm), at most S in total.
    """
    n = labels.shape[0]
    pos = labels >= 1
    neg = labels == 0
    max_pos = int(batch_size_per_image * positive_fraction)
    num_pos = jnp.minimum(jnp.sum(pos, dtype=jnp.int32), max_pos)
    num_neg = jnp.minimum(jnp.sum(neg, dtype=jnp.int32), batch_size_per_image - num_pos)
    k_pos, k_neg = jax.random.split(key)

    def pick(k, mask, count, limit):
        # A uniformly random subset: rank the members by i.i.d. uniform priorities.
        limit = min(limit, n)
        prio = jnp.where(mask, jax.random.uniform(k, (n,)), -1.0)
        _, idx = jax.lax.top_k(prio, limit)
        chosen = jnp.arange(limit) < count
        return jnp.zeros((n,), bool).at[idx].set(chosen)

    return pick(k_pos, pos, num_pos, max_pos), pick(k_neg, neg, num_neg, batch_size_per_image)


def sampled_indices(positive, negative, count: int):
    """Indices of the sampled entries, positives first: ([count] int32, [count] bool valid).

    positive, negative: [N] bool masks from `sample_balanced` with at most `count` set.
    """
    n = positive.shape[0]
    # positives first, then negatives, each in index order; unsampled last
    key = jnp.where(positive, 0, jnp.where(negative, 1, 2)) * n + jnp.arange(n)
    _, order = jax.lax.top_k(-key, min(count, n))
    valid = (positive | negative)[order]
    if count > n:
        order = jnp.concatenate([order, jnp.zeros((count - n,), order.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((count - n,), bool)])
    return order.astype(jnp.int32), valid
