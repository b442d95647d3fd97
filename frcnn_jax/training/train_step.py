"""The training forward pass (four named losses) and one jitted optax step.

    state = create_train_state(model, variables, optim_cfg, seed)
    step_fn = make_train_step(model, tx)                  # pure: (state, batch) -> (state, metrics)
    state, metrics = jax.jit(step_fn, donate_argnums=0)(state, batch)

`batch` is the input pipeline's dict (`frcnn_jax.data`): image [B, H, W, 3] normalised
canvas, image_size [B, 2], boxes [B, G, 4] (canvas pixels), labels [B, G], gt_valid
[B, G], is_crowd [B, G]. Crowd boxes are ignored (treated as absent ground truth).
Randomness (the two samplers) comes from `state.rng` folded with the step, so a
resumed run draws exactly the same samples.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from frcnn_jax.modeling.box_head import box_head_loss
from frcnn_jax.modeling.faster_rcnn import FasterRCNN
from frcnn_jax.modeling.resnet import frozen_param_prefixes
from frcnn_jax.modeling.rpn import level_anchors, rpn_loss
from frcnn_jax.training.optim import OptimConfig, make_optimizer
from frcnn_jax.training.targets import box_head_targets, rpn_targets

LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
STAT_NAMES = ("rpn_positives", "roi_foreground", "proposals")  # sampling statistics, per-image means
# Every metric of a step made with a learning-rate schedule (`make_train_step(..., learning_rate)`).
METRIC_NAMES = ("loss",) + LOSS_NAMES + STAT_NAMES + ("grad_norm", "lr")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    frozen: Any  # frozen batch-norm statistics (never trained)
    opt_state: Any
    rng: jax.Array  # base PRNG key; step keys are fold_in(rng, step)


def trainable_frozen_prefixes(model: FasterRCNN) -> tuple[str, ...]:
    """Full parameter paths frozen by `freeze_at` (stem / early stages of the trunk)."""
    return tuple(f"backbone/body/{p}" for p in frozen_param_prefixes(model.cfg.freeze_at))


def create_train_state(model: FasterRCNN, variables, optim_cfg: OptimConfig, seed: int):
    tx = make_optimizer(optim_cfg, variables["params"], trainable_frozen_prefixes(model))
    state = TrainState(
        step=jnp.int32(0),
        params=variables["params"],
        frozen=variables["frozen"],
        opt_state=tx.init(variables["params"]),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
    return state, tx


def _training_forward(module: FasterRCNN, batch, key):
    """Runs inside `model.apply`: features -> RPN (+ targets, loss) -> proposals -> sampled ROIs -> box loss."""
    cfg = module.cfg
    images, sizes = batch["image"], batch["image_size"]
    canvas = images.shape[1:3]
    b = images.shape[0]
    gt_boxes = batch["boxes"].astype(jnp.float32)
    gt_valid = batch["gt_valid"] & ~batch["is_crowd"]
    k_rpn, k_roi = jax.random.split(key)

    feats = module.features(images)
    objectness, deltas = module.rpn_outputs(feats)
    anchors = jnp.concatenate(
        level_anchors(canvas, [f.shape[1:3] for f in feats], cfg.level_anchor_sizes(), cfg.aspect_ratios)
    )
    rpn_t = jax.vmap(
        functools.partial(
            rpn_targets,
            anchors=anchors,
            fg_iou_thresh=cfg.rpn_fg_iou_thresh,
            bg_iou_thresh=cfg.rpn_bg_iou_thresh,
            batch_size_per_image=cfg.rpn_batch_size_per_image,
            positive_fraction=cfg.rpn_positive_fraction,
        )
    )(jax.random.split(k_rpn, b), gt_boxes=gt_boxes, gt_valid=gt_valid)
    loss_obj, loss_rpn_box = rpn_loss(
        jnp.concatenate(objectness, axis=1), jnp.concatenate(deltas, axis=1), rpn_t, beta=cfg.rpn_box_loss_beta
    )

    props, _, prop_valid = module.proposals(feats, objectness, deltas, sizes, canvas, train=True)
    roi_t = jax.vmap(
        functools.partial(
            box_head_targets,
            fg_iou_thresh=cfg.box_fg_iou_thresh,
            bg_iou_thresh=cfg.box_bg_iou_thresh,
            batch_size_per_image=cfg.box_batch_size_per_image,
            positive_fraction=cfg.box_positive_fraction,
            bbox_reg_weights=cfg.bbox_reg_weights,
        )
    )(jax.random.split(k_roi, b), jax.lax.stop_gradient(props), prop_valid, gt_boxes, batch["labels"], gt_valid)
    logits, box_deltas = module.box_predictions(feats, roi_t["boxes"], canvas)
    loss_cls, loss_box = box_head_loss(logits, box_deltas, roi_t, beta=cfg.box_loss_beta)

    losses = dict(zip(LOSS_NAMES, (loss_obj, loss_rpn_box, loss_cls, loss_box)))
    stats = {
        "rpn_positives": jnp.mean(jnp.sum(rpn_t["positive"], axis=1).astype(jnp.float32)),
        "roi_foreground": jnp.mean(jnp.sum(roi_t["valid"] & (roi_t["labels"] > 0), axis=1).astype(jnp.float32)),
        "proposals": jnp.mean(jnp.sum(prop_valid, axis=1).astype(jnp.float32)),
    }
    return losses, stats


def compute_losses(model: FasterRCNN, params, frozen, batch, key):
    """(total loss, {4 named losses}, {statistics}) for a batch."""
    losses, stats = model.apply({"params": params, "frozen": frozen}, batch, key, method=_training_forward)
    total = sum(losses.values())
    return total, losses, stats


def make_train_step(model: FasterRCNN, tx: optax.GradientTransformation, learning_rate=None):
    """Returns the pure step function (state, batch) -> (state, metrics); jit it yourself.

    metrics: "loss" (total), the four named losses, "grad_norm", "lr" (if a schedule
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
