"""SGD with momentum, weight decay, warm-up and step / cosine decay (optax).

Follows maskrcnn-benchmark's solver: weight decay on weights only (not on biases),
biases optionally at a higher learning rate (BIAS_LR_FACTOR), linear warm-up from
`warmup_factor * lr`, then x`gamma` at each of `decay_steps` (or cosine to zero).
Frozen parameters (stem and early stages, `model.backbone.freeze_at`, and those whose path
matches `train.freeze`) get no update at all (`optax.set_to_zero`: they stay bitwise unchanged).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from frcnn_jax.modeling.config import dataclass_from_mapping

SCHEDULES = ("step", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bias_lr_factor: float = 1.0
    warmup_steps: int = 500
    warmup_factor: float = 1.0 / 3
    schedule: str = "step"
    decay_steps: tuple[int, ...] = (120_000, 160_000)
    gamma: float = 0.1
    total_steps: int = 180_000  # the schedule's length; the loop sets it from train.num_steps
    clip_grad_norm: float = 0.0  # 0 disables clipping

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> OptimConfig:
        """From a plain mapping (e.g. `config.optim.to_dict()`); unknown keys raise ValueError."""
        return dataclass_from_mapping(cls, values, "optim")

    def __post_init__(self):
        def fail(field, why):
            raise ValueError(f"optim.{field}={getattr(self, field)!r}: {why}")

        if not self.base_lr > 0:
            fail("base_lr", "must be > 0")
        if not 0 <= self.momentum < 1:
            fail("momentum", "must be in [0, 1)")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        if self.bias_lr_factor <= 0:
            fail("bias_lr_factor", "must be > 0")
        if self.warmup_steps < 0:
            fail("warmup_steps", "must be >= 0")
        if not 0 < self.warmup_factor <= 1:
            fail("warmup_factor", "must be in (0, 1]")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {SCHEDULES}")
        if list(self.decay_steps) != sorted(self.decay_steps) or any(s <= 0 for s in self.decay_steps):
            fail("decay_steps", "must be increasing positive steps")
        if not 0 < self.gamma <= 1:
            fail("gamma", "must be in (0, 1]")
        if self.total_steps < 1:
            fail("total_steps", "must be >= 1")
        if self.clip_grad_norm < 0:
            fail("clip_grad_norm", "must be >= 0")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """step -> learning rate (float32), including warm-up."""

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if cfg.schedule == "step":
            factor = jnp.float32(1.0)
            for s in cfg.decay_steps:
                factor = factor * jnp.where(step >= s, cfg.gamma, 1.0)
        elif cfg.schedule == "cosine":
            progress = jnp.clip(step / cfg.total_steps, 0.0, 1.0)
            factor = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:
            factor = jnp.float32(1.0)
        if cfg.warmup_steps > 0:
            alpha = jnp.clip(step / cfg.warmup_steps, 0.0, 1.0)
            factor = factor * jnp.where(step < cfg.warmup_steps, cfg.warmup_factor * (1 - alpha) + alpha, 1.0)
        return cfg.base_lr * factor

    return schedule


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def check_freeze_pattern(pattern: str) -> str:
    """`train.freeze` checked: a Python regular expression (or ""); raises ValueError naming it."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"train.freeze={pattern!r}: not a regular expression ({e})") from None
    return pattern


def is_frozen_path(path: str, frozen_prefixes: Sequence[str] = (), frozen_pattern: str = "") -> bool:
    """Whether the '/'-joined parameter path is frozen: under a prefix, or `re.match`ed by the pattern.

    The pattern matches from the start of the path: "backbone/" freezes the whole backbone,
    "backbone/|rpn/" everything but the box head, ".*bias$" every bias.
    """
    if any(path.startswith(prefix + "/") or path == prefix for prefix in frozen_prefixes):
        return True
    return bool(frozen_pattern) and re.match(frozen_pattern, path) is not None


def param_labels(params, frozen_prefixes: Sequence[str] = (), frozen_pattern: str = ""):
    """Labels each parameter "frozen", "bias" or "weight" (weights are the >= 2-D kernels).

    frozen_prefixes: '/'-joined path prefixes; frozen_pattern: a regular expression
    `re.match`ed against each '/'-joined path ("" matches nothing); see `is_frozen_path`.
    """

    def label(path, leaf):
        if is_frozen_path(_path_str(path), frozen_prefixes, frozen_pattern):
            return "frozen"
        return "weight" if jnp.ndim(leaf) >= 2 else "bias"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    cfg: OptimConfig, params, frozen_prefixes: Sequence[str] = (), frozen_pattern: str = ""
) -> optax.GradientTransformation:
    """The optax transformation for `params` (frozen prefixes are full parameter paths; the
    pattern is `train.freeze`, see `is_frozen_path`)."""
    lr = learning_rate_schedule(cfg)

    def sgd(lr_scale, decay):
        parts = []
        if decay > 0:
            parts.append(optax.add_decayed_weights(decay))
        parts.append(optax.sgd(lambda s: lr(s) * lr_scale, momentum=cfg.momentum or None))
        return optax.chain(*parts)

    tx = optax.multi_transform(
        {
            "weight": sgd(1.0, cfg.weight_decay),
            "bias": sgd(cfg.bias_lr_factor, 0.0),
            "frozen": optax.set_to_zero(),
        },
        param_labels(params, frozen_prefixes, frozen_pattern),
    )
    if cfg.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), tx)
    return tx
