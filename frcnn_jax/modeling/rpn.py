"""Region Proposal Network, both paths: the head, the anchors, proposals, and (training) targets and loss.

    RPN.__call__(features)                  -> per-level objectness, deltas (the head, params at `rpn/head`)
    rpn_anchors(cfg, canvas_hw, features)   -> per-level anchors, computed once per forward pass
    rpn_proposals(cfg, ..., train=...)      -> proposals [B, P, 4], scores, valid (inference and training)
    rpn_losses(cfg, ..., key)               -> loss_objectness, loss_rpn_box_reg, sampling statistics
    rpn_targets / rpn_loss                  -> the per-image assignment and the batch loss they use

Shapes: B images, L levels, N_l = H_l * W_l * A anchors on level l (A per cell), N = sum N_l,
G padded ground-truth boxes, P = post-NMS top-n proposals per image.

Proposals follow torchvision's `RegionProposalNetwork.filter_proposals` step by step,
with static shapes: per level keep the top-k anchors by objectness, decode them, clip
to the image's true size, mask boxes below `min_size` and scores below
`score_thresh`, NMS across levels (each level its own class), and keep a fixed
`post_nms_top_n` boxes per image with a validity mask.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax import ops
from frcnn_jax.modeling.config import ModelConfig, compute_dtype
from frcnn_jax.modeling.conv import Conv
from frcnn_jax.modeling.matcher import match
from frcnn_jax.modeling.resnet import maybe_remat_call
from frcnn_jax.modeling.sampler import sample_balanced
from frcnn_jax.ops import losses


class RPNHead(nn.Module):
    """Shared over levels: relu(conv3x3) -> 1x1 objectness [A] and 1x1 deltas [4A].

    Input: list of [N, H_l, W_l, C] maps. Output: (objectness [N, H_l*W_l*A] per level,
    deltas [N, H_l*W_l*A, 4] per level), flattened in anchor order (y, x, a) — the same
    order as `ops.generate_anchors` and torchvision.

    `remat`: each conv, on every level, is a `resnet.remat_call`: nothing is recomputed
    (a conv's backward needs only its input, kept either way), but the backward's
    copies of that input (the 3x3 conv's tap copies on P2, `conv.py`'s CPU kernel
    gradient) stay out of the forward pass (see `FPN`).
    """

    num_anchors: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]):
        init = nn.initializers.normal(0.01)  # torchvision: normal(std=0.01), bias 0
        make = functools.partial(Conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels, kernel_init=init)
        conv = make(features[0].shape[-1], 3, name="conv")
        cls_logits = make(self.num_anchors, 1, name="cls_logits")
        bbox_pred = make(4 * self.num_anchors, 1, name="bbox_pred")
        objectness, deltas = [], []
        call = functools.partial(maybe_remat_call, remat=self.remat)
        for f in features:
            t = nn.relu(call(conv, f))
            n = f.shape[0]
            objectness.append(call(cls_logits, t).reshape(n, -1).astype(jnp.float32))
            deltas.append(call(bbox_pred, t).reshape(n, -1, 4).astype(jnp.float32))
        return objectness, deltas


def level_anchors(canvas_hw, feature_hws, sizes_per_level, aspect_ratios):
    """Anchors per level for a static canvas: list of [H_l*W_l*A, 4] float32.

    The stride is canvas size // feature size per axis, as torchvision derives it.
    """
    out = []
    for (fh, fw), sizes in zip(feature_hws, sizes_per_level):
        stride = (canvas_hw[0] // fh, canvas_hw[1] // fw)
        out.append(ops.generate_anchors((fh, fw), stride, sizes, aspect_ratios))
    return out


def select_proposals(
    objectness: Sequence[jax.Array],
    deltas: Sequence[jax.Array],
    anchors: Sequence[jax.Array],
    image_size,
    *,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    score_thresh: float,
):
    """Proposals of ONE image (vmap over the batch).

    Args:
      objectness: per level [N_l] logits. deltas: per level [N_l, 4]. anchors: per level [N_l, 4].
      image_size: [2] (h, w) of the true (unpadded) image inside the canvas; may be traced.
      pre_nms_top_n: anchors kept per level before NMS (capped at N_l).
      post_nms_top_n: proposals returned (static).
    Returns:
      boxes [post_nms_top_n, 4] float32 (zeros where invalid), scores [post_nms_top_n]
      (sigmoid objectness, 0 where invalid), valid [post_nms_top_n] bool. Valid entries
      come first, in decreasing score order: torchvision's proposals for this image.
    """
    boxes, logits, lvls = [], [], []
    for lvl, (obj, dlt, anc) in enumerate(zip(objectness, deltas, anchors)):
        k = min(pre_nms_top_n, obj.shape[0])
        top, idx = jax.lax.top_k(jax.lax.stop_gradient(obj), k)
        d = jax.lax.stop_gradient(dlt)[idx]
        boxes.append(ops.decode_boxes(d, anc[idx]))
        logits.append(top)
        lvls.append(jnp.full((k,), lvl, jnp.int32))
    boxes = jnp.concatenate(boxes)
    scores = jax.nn.sigmoid(jnp.concatenate(logits))
    lvls = jnp.concatenate(lvls)
    boxes = ops.clip_boxes(boxes, image_size[0], image_size[1])
    valid = ~ops.small_box_mask(boxes, min_size) & (scores >= score_thresh)
    if len(objectness) == 1:
        keep = ops.nms(boxes, scores, nms_thresh, post_nms_top_n, valid=valid)
    else:
        keep = ops.batched_nms(boxes, scores, lvls, nms_thresh, post_nms_top_n, valid=valid)
    ok = keep >= 0
    safe = jnp.maximum(keep, 0)
    return (
        jnp.where(ok[:, None], boxes[safe], 0.0),
        jnp.where(ok, scores[safe], 0.0),
        ok,
    )


def rpn_loss(objectness, deltas, targets, *, beta: float = 1.0 / 9):
    """torchvision's RPN loss over a batch.

    Args:
      objectness: [B, N] logits (all levels concatenated); deltas: [B, N, 4].
      targets: dict from `rpn_targets`, batched: targets [B, N, 4],
        positive [B, N], negative [B, N] sampled masks.
    Returns:
      (loss_objectness, loss_rpn_box_reg): binary cross-entropy averaged over the
      sampled anchors, and smooth-L1 (beta 1/9) summed over the positives divided by
      the number of sampled anchors — both over the whole batch, as torchvision does.
    """
    pos, neg = targets["positive"], targets["negative"]
    sampled = pos | neg
    count = jnp.maximum(jnp.sum(sampled), 1).astype(jnp.float32)
    bce = losses.sigmoid_binary_cross_entropy(objectness.astype(jnp.float32), pos.astype(jnp.float32))
    loss_obj = jnp.sum(jnp.where(sampled, bce, 0.0)) / count
    reg = losses.smooth_l1(deltas.astype(jnp.float32) - targets["targets"], beta).sum(-1)
    loss_box = jnp.sum(jnp.where(pos, reg, 0.0)) / count
    return loss_obj, loss_box


def rpn_targets(
    key,
    anchors,
    gt_boxes,
    gt_valid,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
):
    """Anchor labels, regression targets and the balanced sample of ONE image.

    Ground truth is padded to [G, 4] with a `gt_valid` mask (crowd boxes are passed as
    invalid, so they are ignored); an image without ground truth gives all-background targets.

    Args:
      key: PRNG key for the sampler.
      anchors: [N, 4] all levels concatenated, in the RPN head's output order.
      gt_boxes: [G, 4] padded ground truth (canvas pixels); gt_valid: [G] bool.
    Returns:
      dict: labels [N] int32 (1 object, 0 background, -1 ignored), targets [N, 4]
      (`encode_boxes(matched gt, anchor)`, zero where not positive), positive [N] bool
      and negative [N] bool sampled masks (at most batch_size_per_image together).
    """
    iou = ops.box_iou(gt_boxes, anchors)
    matches = match(iou, gt_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
    labels = jnp.where(matches >= 0, 1, jnp.where(matches == -1, 0, -1)).astype(jnp.int32)
    positive, negative = sample_balanced(key, labels, batch_size_per_image, positive_fraction)
    matched = gt_boxes[jnp.maximum(matches, 0)]
    targets = ops.encode_boxes(matched, anchors)
    targets = jnp.where((labels == 1)[:, None], targets, 0.0)  # no NaN/inf where unused
    return {"labels": labels, "targets": targets, "positive": positive, "negative": negative}


# --- the stage, wired to the config ------------------------------------------------------


def rpn_anchors(cfg: ModelConfig, canvas_hw, features) -> list[jax.Array]:
    """Per-level anchors [N_l, 4] for `features` (list of [B, H_l, W_l, C]) on a static canvas."""
    hws = [f.shape[1:3] for f in features]
    return level_anchors(canvas_hw, hws, cfg.level_anchor_sizes(), cfg.anchors.aspect_ratios)


def rpn_proposals(cfg: ModelConfig, objectness, deltas, anchors, image_sizes, *, train: bool):
    """Proposals of a batch: boxes [B, P, 4], scores [B, P], valid [B, P] (P = post-NMS top-n, static).

    objectness: per level [B, N_l]; deltas: per level [B, N_l, 4]; anchors: per level [N_l, 4];
    image_sizes: [B, 2] int32 (h, w). `train` picks `cfg.rpn.train` or `cfg.rpn.test` (the top-n counts).
    """
    rpn, counts = cfg.rpn, cfg.rpn.proposals(train)
    fn = functools.partial(
        select_proposals,
        anchors=anchors,
        pre_nms_top_n=counts.pre_nms_top_n,
        post_nms_top_n=counts.post_nms_top_n,
        nms_thresh=rpn.nms_thresh,
        min_size=rpn.min_size,
        score_thresh=rpn.score_thresh,
    )
    return jax.vmap(lambda o, d, s: fn(o, d, image_size=s))(objectness, deltas, image_sizes)


def rpn_losses(cfg: ModelConfig, objectness, deltas, anchors, gt_boxes, gt_valid, key):
    """The RPN's training loss for a batch: targets for every anchor, then `rpn_loss`.

    objectness / deltas / anchors: per level, as from `RPN` and `rpn_anchors` (concatenated
    here, in the head's order); gt_boxes [B, G, 4]; gt_valid [B, G] (crowd excluded);
    key: PRNG key (split per image).
    Returns: (loss_objectness, loss_rpn_box_reg, positives [B] int32 sampled positive anchors).
    """
    b = gt_boxes.shape[0]
    targets = jax.vmap(
        functools.partial(
            rpn_targets,
            anchors=jnp.concatenate(anchors),
            **dataclasses.asdict(cfg.rpn.assigner),
        )
    )(jax.random.split(key, b), gt_boxes=gt_boxes, gt_valid=gt_valid)
    loss_obj, loss_box = rpn_loss(
        jnp.concatenate(objectness, axis=1), jnp.concatenate(deltas, axis=1), targets, beta=cfg.rpn.box_loss_beta
    )
    return loss_obj, loss_box, jnp.sum(targets["positive"], axis=1)


class RPN(nn.Module):
    """The RPN stage's parameters: its head (at `rpn/head`); features -> per-level (objectness, deltas)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.head = RPNHead(
            cfg.num_anchors_per_location,
            dtype=compute_dtype(cfg),
            remat=cfg.remats("rpn_head"),
            cpu_kernels=cfg.cpu_kernels,
        )

    def __call__(self, features):
        return self.head(features)
