"""One optax step on the model's named losses (`FasterRCNN.losses`): gradients and updates only.

    state = create_train_state(model, variables, optim_cfg, seed)
    step_fn = make_train_step(model, tx)                  # pure: (state, batch) -> (state, metrics)
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)

`batch` is the input pipeline's dict (`frcnn_jax.data`; see `FasterRCNN.losses`).
Randomness (the two samplers) comes from `state.rng` folded with the step, so a
resumed run draws exactly the same samples.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import STAT_NAMES, FasterRCNN, loss_names
from frcnn_jax.modeling.param_paths import frozen_param_paths
from frcnn_jax.training.optim import OptimConfig, make_optimizer


def metric_names(cfg: ModelConfig) -> tuple[str, ...]:
    """Every metric of a step of `FasterRCNN(cfg)` made with a learning-rate schedule
    (`make_train_step(..., learning_rate)`): the total, `loss_names(cfg)`, the statistics, grad_norm, lr."""
    return ("loss",) + loss_names(cfg) + STAT_NAMES + ("grad_norm", "lr")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    frozen: Any  # frozen batch-norm statistics (never trained)
    opt_state: Any
    rng: jax.Array  # base PRNG key; step keys are fold_in(rng, step)


def create_train_state(model: FasterRCNN, variables, optim_cfg: OptimConfig, seed: int, freeze: str = ""):
    """(TrainState at step 0, the optax transformation) for `variables` ({"params", "frozen"}).

    Frozen (never updated): the stages `model.cfg.backbone.freeze_at` names, and every
    parameter whose '/'-joined path `freeze` (a regular expression, `train.freeze`) matches.
    """
    tx = make_optimizer(optim_cfg, variables["params"], frozen_param_paths(model.cfg), freeze)
    state = TrainState(
        step=jnp.int32(0),
        params=variables["params"],
        frozen=variables["frozen"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return state, tx


def compute_losses(model: FasterRCNN, params, frozen, batch, key):
    """(total loss, {`loss_names(model.cfg)`: loss}, {statistics}) for a batch."""
    losses, stats = model.apply({"params": params, "frozen": frozen}, batch, key, method=FasterRCNN.losses)
    total = sum(losses.values())
    return total, losses, stats


def make_train_step(model: FasterRCNN, tx: optax.GradientTransformation, learning_rate=None):
    """Returns the pure step function (state, batch) -> (state, metrics); jit it yourself.

    metrics: "loss" (total), the named losses (`loss_names(model.cfg)`), "grad_norm", "lr" (if a schedule
    is given) and the sampling statistics.
    """

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

        def loss_fn(params):
            total, losses, stats = compute_losses(model, params, state.frozen, batch, key)
            return total, (losses, stats)

        (total, (losses, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total, **losses, **stats, "grad_norm": optax.tree.norm(grads)}
        if learning_rate is not None:
            metrics["lr"] = learning_rate(state.step)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
