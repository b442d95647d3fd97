"""Training targets for the RPN (anchors) and the box head (proposals + ground truth).

Per image, static shapes: ground truth is padded to [G, 4] with a `gt_valid` mask
(crowd boxes are passed as invalid, so they are ignored in training); an image without
ground truth gives all-background targets.
"""

from __future__ import annotations

import jax.numpy as jnp

from frcnn_jax import ops
from frcnn_jax.training.matcher import match
from frcnn_jax.training.sampler import sample_balanced, sampled_indices


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


def box_head_targets(
    key,
    proposals,
    proposal_valid,
    gt_boxes,
    gt_labels,
    gt_valid,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
    bbox_reg_weights,
):
    """Sampled ROIs and their targets for ONE image (torchvision `select_training_samples`).

    Ground-truth boxes are appended to the proposals, every candidate is matched
    (IoU >= fg: its ground truth's class; < bg: background), and a balanced sample of
    S = batch_size_per_image candidates is drawn.

    Args:
      proposals: [P, 4] (stop-gradient), proposal_valid: [P] bool.
      gt_boxes: [G, 4], gt_labels: [G] int32 (1..K), gt_valid: [G] bool.
    Returns:
      dict: boxes [S, 4] sampled ROIs, labels [S] int32 (0 background), targets [S, 4]
      (`encode_boxes(gt, roi, bbox_reg_weights)`, zero for background), valid [S] bool
      (False where there were fewer than S candidates), index [S] into the
      concatenation [proposals; gt_boxes].
    """
    boxes = jnp.concatenate([proposals, gt_boxes], axis=0)
    valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
    iou = ops.box_iou(gt_boxes, boxes)
    iou = jnp.where(valid[None, :], iou, -1.0)
    matches = match(iou, gt_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
    safe = jnp.maximum(matches, 0)
    labels = jnp.where(matches >= 0, gt_labels[safe], jnp.where(matches == -1, 0, -1))
    labels = jnp.where(valid, labels, -1).astype(jnp.int32)
    positive, negative = sample_balanced(key, labels, batch_size_per_image, positive_fraction)
    index, sample_valid = sampled_indices(positive, negative, batch_size_per_image)
    roi = boxes[index]
    roi_labels = jnp.where(sample_valid, labels[index], 0)
    targets = ops.encode_boxes(gt_boxes[safe[index]], roi, bbox_reg_weights)
    targets = jnp.where((roi_labels > 0)[:, None], targets, 0.0)
    return {"boxes": roi, "labels": roi_labels, "targets": targets, "valid": sample_valid, "index": index}
