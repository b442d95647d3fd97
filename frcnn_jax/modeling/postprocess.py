"""Detections from box-head outputs: torchvision's `RoIHeads.postprocess_detections`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frcnn_jax import ops


def postprocess_detections(
    class_logits,
    box_deltas,
    proposals,
    proposal_valid,
    image_size,
    *,
    bbox_reg_weights,
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    min_size: float = 1e-2,
):
    """Final detections of ONE image (vmap over the batch).

    Args:
      class_logits: [P, C] (C includes background at index 0).
      box_deltas: [P, C, 4] class-specific deltas.
      proposals: [P, 4] in canvas pixels; proposal_valid: [P] bool.
      image_size: [2] (h, w) true image size in the canvas (boxes are clipped to it).
    Returns:
      dict with boxes [D, 4] float32 (canvas pixels), scores [D], labels [D] int32
      (1..C-1), valid [D] bool; D = detections_per_img, valid entries first in
      decreasing score order, zeros after. Same steps as torchvision: softmax, per-class
      decode and clip, drop background, score > thresh, drop boxes smaller than
      min_size, per-class NMS, keep the top `detections_per_img`.
    """
    num_props, num_classes = class_logits.shape
    scores = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, 1:]  # [P, C-1]
    boxes = ops.decode_boxes(box_deltas[:, 1:], proposals[:, None, :], bbox_reg_weights)  # [P, C-1, 4]
    boxes = ops.clip_boxes(boxes, image_size[0], image_size[1])
    labels = jnp.broadcast_to(jnp.arange(1, num_classes, dtype=jnp.int32), scores.shape)
    boxes = boxes.reshape(-1, 4)
    scores = scores.reshape(-1)
    labels = labels.reshape(-1)
    valid = jnp.repeat(proposal_valid, num_classes - 1) & (scores > score_thresh) & ~ops.small_box_mask(boxes, min_size)
    keep = ops.batched_nms(boxes, scores, labels, nms_thresh, detections_per_img, valid=valid)
    ok = keep >= 0
    safe = jnp.maximum(keep, 0)
    return {
        "boxes": jnp.where(ok[:, None], boxes[safe], 0.0),
        "scores": jnp.where(ok, scores[safe], 0.0),
        "labels": jnp.where(ok, labels[safe], 0),
        "valid": ok,
    }
