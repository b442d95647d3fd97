"""Mask R-CNN training targets and loss as pure functions (torchvision's `maskrcnn_loss`).

    pos = select_positives(roi_labels, roi_valid, num_positives=128)      # [B, P] static count
    targets = mask_targets(rois, matched, pos, gt_masks, gt_mask_boxes, mask_size=28)
    loss = mask_loss(mask_logits, labels_of_pos, targets, pos.valid)

Shapes: B images, R sampled ROIs per image (512), P = int(R * positive_fraction) foreground
ROIs kept per image (128), G padded ground truth, S the host crop size (112), M the mask
head's output size (28), K classes including background.

Targets, exactly and approximately
----------------------------------
torchvision's target of a foreground ROI is `roi_align(gt_mask.float(), roi, (M, M),
spatial_scale=1, sampling_ratio=0, aligned=False)` of its matched ground-truth mask at the
resized image's resolution, not thresholded (`project_masks_on_boxes`).

- `mask_targets_full` computes exactly that from full-resolution masks [B, G, H, W]
  (`ops.multilevel_roi_align` with torchvision's semantics): the reference path, for tests
  and the fidelity measurement; its memory is G x H x W per image, too much for training.
- `mask_targets` computes it from the host's S x S crops (`frcnn_jax.data.masks`): crop g
  holds `roi_align(mask, crop_box_g, (S, S))` with a one-bin zero border, so the mask is
  known at the crop's bin centres, box-filtered over one bin. Each ROI is mapped into its
  ground truth's crop frame (u = (x - c1) * S / crop_w - 0.5, in crop cells) and pooled there
  with the same `roi_align` (adaptive sampling in crop cells, aligned). The approximation:
  bilinear interpolation between crop cells instead of between mask pixels, and the
  sample count ceil(roi / M) counted in crop cells instead of pixels. Against
  torchvision on coco128's real polygons (README, "Data"): mean absolute difference and
  IoU of the 0.5-thresholded targets in the README; the tests bound it.

Loss: binary cross-entropy with logits on the ground-truth class's channel, averaged over
every valid positive x M^2 of the batch; exactly 0 with zero gradients when the batch has
no positive (torchvision returns `mask_logits.sum() * 0`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from frcnn_jax import ops

MASK_SCALE = 255.0  # the host stores crops as uint8 round(255 * value) (frcnn_jax.data.masks)


class Positives(NamedTuple):
    """The foreground ROIs of each image, a static count P.

    index: int32 [B, P] rows of the sampled ROIs (0 where invalid).
    valid: bool [B, P] a real foreground ROI.
    """

    index: jax.Array
    valid: jax.Array


def select_positives(roi_labels, roi_valid, num_positives: int = 128) -> Positives:
    """The first `num_positives` foreground ROIs of each image, in ROI order.

    Args:
      roi_labels: int32 [B, R] sampled ROIs' labels (0 background).
      roi_valid: bool [B, R] real samples.
      num_positives: P, static; the box sampler keeps at most int(R * positive_fraction)
        foreground ROIs (512 x 0.25 = 128), so P = that loses none.
    Returns:
      Positives (index int32 [B, P], valid bool [B, P]).
    """
    roi_labels = jnp.asarray(roi_labels)
    r = roi_labels.shape[-1]
    fg = jnp.asarray(roi_valid) & (roi_labels > 0)
    key = jnp.where(fg, 0, r) + jnp.arange(r)  # foreground first, each group in ROI order
    k = min(int(num_positives), r)
    _, order = jax.lax.top_k(-key, k)
    valid = jnp.take_along_axis(fg, order, axis=-1)
    if num_positives > r:
        pad = [(0, 0)] * (order.ndim - 1) + [(0, num_positives - r)]
        order, valid = jnp.pad(order, pad), jnp.pad(valid, pad)
    return Positives(jnp.where(valid, order, 0).astype(jnp.int32), valid)


def gather_rows(values, index):
    """values [B, R, ...] -> [B, P, ...] at `index` int32 [B, P] (e.g. the positives' boxes, labels)."""
    index = index.reshape(index.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, index, axis=1)


def _flat_gt_index(matched, num_gt: int):
    b = matched.shape[0]
    return (jnp.arange(b, dtype=jnp.int32)[:, None] * num_gt + jnp.clip(matched, 0, num_gt - 1)).reshape(-1)


def mask_targets_full(rois, matched, valid, gt_masks, *, mask_size: int = 28):
    """Exact torchvision targets from full-resolution masks (`project_masks_on_boxes`).

    Args:
      rois: [B, P, 4] float32 (x1, y1, x2, y2) foreground ROIs in the resized image's pixels.
      matched: int32 [B, P] each ROI's ground-truth row in 0..G-1.
      valid: bool [B, P]; invalid rows give zero targets.
      gt_masks: [B, G, H, W] masks (uint8 / bool / float, values 0..1) on the canvas.
      mask_size: M (static).
    Returns:
      float32 [B, P, M, M] soft targets in [0, 1] (no threshold).
    """
    b, p = matched.shape
    g, h, w = gt_masks.shape[1:]
    feats = jnp.asarray(gt_masks).astype(jnp.float32).reshape(b * g, h, w, 1)
    zeros = jnp.zeros((b * p,), jnp.int32)
    out = ops.multilevel_roi_align(
        [feats], [1.0], jnp.asarray(rois, jnp.float32).reshape(b * p, 4), _flat_gt_index(matched, g), zeros,
        mask_size, sampling_ratio=0, aligned=False,
    )  # fmt: skip
    out = jax.lax.stop_gradient(out.reshape(b, p, mask_size, mask_size))
    return jnp.where(valid[..., None, None], out, 0.0)


def rois_in_crop_frame(rois, crop_boxes, crop_size: int):
    """Maps ROIs into their ground truth's S x S crop (the `aligned=True` box coordinates there).

    Args:
      rois: [..., 4] (x1, y1, x2, y2) image pixels; widths and heights below 1 pixel are
        raised to 1 first, as torchvision's aligned=False roi_align does.
      crop_boxes: [..., 4] the crop box of each ROI's ground truth (`gt_mask_boxes`).
      crop_size: S.
    Returns:
      float32 [..., 4]: (x - c1) * S / crop_w (y likewise); with roi_align(aligned=True) a
      point x of the image samples crop cell coordinate (x - c1) * S / crop_w - 0.5, where
      cell j holds the mask averaged around x = c1 + (j + 0.5) * crop_w / S.
    """
    rois = jnp.asarray(rois, jnp.float32)
    crop_boxes = jnp.asarray(crop_boxes, jnp.float32)
    x1, y1 = rois[..., 0], rois[..., 1]
    x2 = x1 + jnp.maximum(rois[..., 2] - x1, 1.0)
    y2 = y1 + jnp.maximum(rois[..., 3] - y1, 1.0)
    cx1, cy1 = crop_boxes[..., 0], crop_boxes[..., 1]
    sx = crop_size / jnp.maximum(crop_boxes[..., 2] - cx1, 1e-6)
    sy = crop_size / jnp.maximum(crop_boxes[..., 3] - cy1, 1e-6)
    return jnp.stack([(x1 - cx1) * sx, (y1 - cy1) * sy, (x2 - cx1) * sx, (y2 - cy1) * sy], axis=-1)


def mask_targets(rois, matched, valid, gt_masks, gt_mask_boxes, *, mask_size: int = 28):
    """Each foreground ROI's M x M target from the host's S x S crops (approximates `mask_targets_full`).

    Args:
      rois: [B, P, 4] float32 (x1, y1, x2, y2) foreground ROIs in the resized image's pixels.
      matched: int32 [B, P] each ROI's ground-truth row in 0..G-1.
      valid: bool [B, P]; invalid rows give zero targets.
      gt_masks: [B, G, S, S] crops: uint8 round(255 * value) as the pipeline batches them
        (`batch["gt_masks"]`), or float values in [0, 1].
      gt_mask_boxes: float32 [B, G, 4] their crop boxes (`batch["gt_mask_boxes"]`).
      mask_size: M (static).
    Returns:
      float32 [B, P, M, M] soft targets in [0, 1] (no threshold), gradient-free.
    """
    b, p = matched.shape
    g, s = gt_masks.shape[1], gt_masks.shape[-1]
    crops = jnp.asarray(gt_masks)
    crops = crops.astype(jnp.float32) / MASK_SCALE if crops.dtype == jnp.uint8 else crops.astype(jnp.float32)
    crop_boxes = gather_rows(jnp.asarray(gt_mask_boxes, jnp.float32), jnp.clip(matched, 0, g - 1))
    boxes = rois_in_crop_frame(rois, crop_boxes, s).reshape(b * p, 4)
    zeros = jnp.zeros((b * p,), jnp.int32)
    out = ops.multilevel_roi_align(
        [crops.reshape(b * g, s, s, 1)], [1.0], boxes, _flat_gt_index(matched, g), zeros, mask_size,
        sampling_ratio=0, aligned=True,
    )  # fmt: skip
    out = jax.lax.stop_gradient(jnp.clip(out.reshape(b, p, mask_size, mask_size), 0.0, 1.0))
    return jnp.where(valid[..., None, None], out, 0.0)


def mask_loss(mask_logits, labels, targets, valid):
    """torchvision's `maskrcnn_loss` on static shapes.

    Args:
      mask_logits: [..., K, M, M] (e.g. [B, P, K, M, M] or [R, K, M, M]) any float dtype.
      labels: int32 [...] the ground-truth class of each ROI (1..K-1).
      targets: float32 [..., M, M] soft targets (`mask_targets`).
      valid: bool [...] real foreground ROIs.
    Returns:
      float32 scalar: sigmoid binary cross-entropy with logits on each ROI's label channel,
      summed over the valid ROIs and divided by (number of valid ROIs) x M^2; exactly 0,
      with zero gradient, without any valid ROI.
    """
    logits = jnp.asarray(mask_logits).astype(jnp.float32)
    labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, logits.shape[-3] - 1)
    picked = jnp.take_along_axis(logits, labels[..., None, None, None], axis=-3)[..., 0, :, :]
    bce = optax.sigmoid_binary_cross_entropy(picked, jnp.asarray(targets, jnp.float32))
    valid = jnp.asarray(valid, bool)
    total = jnp.sum(jnp.where(valid[..., None, None], bce, 0.0))
    count = jnp.sum(valid).astype(jnp.float32) * (picked.shape[-1] * picked.shape[-2])
    return total / jnp.maximum(count, 1.0)
