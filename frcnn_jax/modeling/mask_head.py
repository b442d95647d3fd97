"""The Mask R-CNN branch: pooling the detected boxes, mask head, predictor, the label's channel, sigmoid.

    mask_probabilities(pooler, head, predictor, features, boxes, labels, valid, canvas_hw)
                                                   -> [B, D, M, M] probabilities (inference)
    MaskRCNNHeads      FPN head `roi_heads/mask_head/{i}/0`: 3x3 conv + ReLU per entry of conv_channels
    MaskRCNNPredictor  `roi_heads/mask_predictor/{conv5_mask, mask_fcn_logits}`: 2x2 stride-2
                       transposed conv + ReLU, 1x1 conv to K logits
    LabelLogits        `mask_fcn_logits`, all K channels or each row's label channel only
    select_label_masks the predicted label's channel of full logits -> sigmoid

The C4 model has no `mask_head` parameters: its head is the box head's res5
(`roi_heads/box_head/layer4`, the same parameters; `architectures.py` wires it).

Training (`RoIHeads.losses` composes them; torchvision's `maskrcnn_loss`):

    mask_head_targets(...)  -> the box sampler's foreground ROIs (static P per image) and their targets
    mask_loss(...)          -> loss_mask (label_mask_loss: from the label channels alone)
    slot_buckets, bucket_index  the fewer slots (P, P/2, ...) that still hold every image's positives

Shapes: B images, D detections per image, R = B * D pooled boxes, S pooler resolution,
M mask resolution (FPN 2S = 28, C4 S = 14), K classes including background.

Training targets and loss, as pure functions
--------------------------------------------

    t = mask_head_targets(sampled["boxes"], sampled["labels"], sampled["valid"], sampled["matched"],
                          batch["gt_masks"], batch["gt_mask_boxes"], batch["image_size"])
    logits = predictor(head(pooler(features, t["boxes"])), t["labels"].reshape(-1))  # [B * P, M, M]
    loss = label_mask_loss(logits.reshape(t["targets"].shape), t["targets"], t["valid"])

(`select_positives` + `gather_rows` + `mask_targets`; `sampled` is the box head's sample
of `roi_heads.box_head_targets`, batched, with each ROI's ground-truth row `matched`.)

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
  known at the crop's cell centres, box-filtered over one cell. Each ROI bin takes
  torchvision's own samples (positions, count ceil(roi / M) capped at `max_samples`, the
  image-border rules) and reads each sample's value from its ground truth's crop by linear
  interpolation between cell centres. The approximation: interpolation between crop
  cells instead of between mask pixels (exact in the limit of small objects, a one-cell
  blur for objects larger than S), and the cap on samples for ROIs above M x max_samples
  pixels. Against
  torchvision on coco128's real polygons (README, "Data"): mean absolute difference and
  IoU of the 0.5-thresholded targets in the README; the tests bound it.

Loss: binary cross-entropy with logits on the ground-truth class's channel, averaged over
every valid positive x M^2 of the batch; exactly 0 with zero gradients when the batch has
no positive (torchvision returns `mask_logits.sum() * 0`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from frcnn_jax import ops
from frcnn_jax.modeling.conv import Conv

# torchvision's MaskRCNNHeads / MaskRCNNPredictor init: kaiming_normal_(mode="fan_out", relu), zero bias.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_transpose_2x2(x, kernel, bias, blocks: bool = False):
    """torch's ConvTranspose2d(kernel 2, stride 2, padding 0): every input cell writes its own 2x2 block.

    Args:
      x: [R, H, W, Cin]; kernel: [2, 2, Cin, Cout] (torch weight [Cin, Cout, 2, 2] transposed
        (2, 3, 0, 1) by the converter); bias: [Cout].
      blocks: return each cell's block unassembled, [R, H, W, 2, 2, Cout] (the matrix
        product's own layout: no transpose of the upsampled map), for `interleave_blocks` later.
    Returns:
      [R, 2H, 2W, Cout], out[2y + a, 2x + b] = sum_c x[y, x, c] kernel[a, b, c] + bias
      (blocks: [R, H, W, 2, 2, Cout], out[y, x, a, b]).
    """
    if blocks:
        return jnp.einsum("rhwc,abcd->rhwabd", x, kernel) + bias
    r, h, w, _ = x.shape
    y = jnp.einsum("rhwc,abcd->rhawbd", x, kernel)
    return y.reshape(r, 2 * h, 2 * w, kernel.shape[-1]) + bias


def interleave_blocks(blocks):
    """[R, H, W, 2, 2, ...] per-cell 2x2 blocks -> [R, 2H, 2W, ...] (`conv_transpose_2x2(blocks=True)`)."""
    r, h, w = blocks.shape[:3]
    y = jnp.moveaxis(blocks, 3, 2)  # [R, H, 2, W, 2, ...]
    return y.reshape(r, 2 * h, 2 * w, *blocks.shape[5:])


class ConvTranspose2x2(nn.Module):
    """`conv_transpose_2x2` with parameters `kernel` [2, 2, Cin, Cout] and `bias` [Cout]."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, blocks: bool = False):
        # torch computes a ConvTranspose weight's fan_out from its dim 0 (Cin) x 2 x 2.
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param("kernel", init, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return conv_transpose_2x2(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype), blocks)


class LabelLogits(nn.Module):
    """torch's 1x1 `mask_fcn_logits` conv (parameters `kernel` [1, 1, C, K], `bias` [K]), optionally
    computing only each row's own class channel.

    __call__(x [R, ..., C], labels None) -> [R, ..., K] logits (the whole 1x1 conv);
    __call__(x [R, ..., C], labels [R] int32) -> [R, ...] logits of channel labels[r] only: a
    matrix-vector product per row instead of K of them. Mask R-CNN reads only that channel,
    in inference (`maskrcnn_inference`) and in the loss (`maskrcnn_loss`), so this is the same
    number computed with 1/K of the work, and its gradient reaches the same parameters.
    """

    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, labels=None):
        kernel = self.param("kernel", KAIMING_FAN_OUT, (1, 1, x.shape[-1], self.num_classes), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), jnp.float32)
        w, b = kernel[0, 0].astype(self.dtype), bias.astype(self.dtype)  # [C, K], [K]
        x = x.astype(self.dtype)
        if labels is None:
            return jnp.einsum("...c,ck->...k", x, w) + b
        labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, self.num_classes - 1)
        picked = jnp.einsum("r...c,rc->r...", x, w.T[labels])
        return picked + b[labels].reshape(-1, *([1] * (picked.ndim - 1)))


class _ConvReLU(nn.Module):
    """torchvision's `Conv2dNormActivation(norm_layer=None)`: the conv is its entry `0`."""

    features: int
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering

    @nn.compact
    def __call__(self, x):
        conv = Conv(
            self.features, 3, dtype=self.dtype, cpu_kernels=self.cpu_kernels, kernel_init=KAIMING_FAN_OUT, name="0"
        )
        return nn.relu(conv(x))


class MaskRCNNHeads(nn.Module):
    """torchvision's FPN mask head: [R, S, S, C] -> [R, S, S, conv_channels[-1]] (3x3 convs + ReLU)."""

    conv_channels: tuple[int, ...] = (256, 256, 256, 256)
    dtype: jnp.dtype = jnp.float32
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for i, c in enumerate(self.conv_channels):
            x = _ConvReLU(c, dtype=self.dtype, cpu_kernels=self.cpu_kernels, name=str(i))(x)
        return x


class MaskRCNNPredictor(nn.Module):
    """[R, s, s, C] -> mask logits float32 (conv5_mask + ReLU, mask_fcn_logits).

    __call__(x) -> [R, 2s, 2s, num_classes] (every class);
    __call__(x, labels [R] int32) -> [R, 2s, 2s], each row's label channel only (`LabelLogits`):
    what inference and the loss read, without the other K - 1 channels or the transpose that
    assembles the upsampled map (the 2x2 blocks are interleaved after the channel is picked).
    """

    num_classes: int
    channels: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, labels=None):
        up = ConvTranspose2x2(self.channels, dtype=self.dtype, name="conv5_mask")
        logits = LabelLogits(self.num_classes, dtype=self.dtype, name="mask_fcn_logits")
        if labels is None:
            return logits(nn.relu(up(x))).astype(jnp.float32)
        picked = logits(nn.relu(up(x, blocks=True)), labels)  # [R, s, s, 2, 2]
        return interleave_blocks(picked).astype(jnp.float32)


def select_label_masks(mask_logits, labels):
    """torchvision `maskrcnn_inference`: the sigmoid of each box's label channel.

    Args:
      mask_logits: [R, M, M, K] float; labels: [R] int32 in [0, K).
    Returns:
      [R, M, M] float32 probabilities.
    """
    picked = jnp.take_along_axis(mask_logits, labels[:, None, None, None], axis=-1)[..., 0]
    return jax.nn.sigmoid(picked.astype(jnp.float32))


def mask_probabilities(
    pooler: Callable,
    head: Callable,
    predictor: Callable,
    features,
    boxes,
    labels,
    valid,
    canvas_hw: tuple[int, int],
):
    """The mask branch's inference path for the final detections of a batch.

    Args:
      pooler: (features, boxes [B, D, 4], canvas_hw) -> [B * D, S, S, C] (`poolers.RoIPooler`).
      head: [R, S, S, C] -> [R, s, s, C'] (FPN `MaskRCNNHeads`; C4 the box head's res5).
      predictor: ([R, s, s, C'], labels [R]) -> [R, M, M] logits of each label's channel
        (`MaskRCNNPredictor`).
      features: the backbone's NHWC maps (RPN levels).
      boxes: [B, D, 4] float32 detections in canvas pixels; labels [B, D] int32; valid [B, D] bool.
      canvas_hw: static (H, W) of the padded canvas.
    Returns:
      masks [B, D, M, M] float32: sigmoid of each detection's label channel; 0 in invalid rows.
    """
    b, d, _ = boxes.shape
    logits = predictor(head(pooler(features, boxes, canvas_hw)), labels.reshape(b * d).astype(jnp.int32))
    probs = jax.nn.sigmoid(logits).reshape(b, d, *logits.shape[1:])
    return jnp.where(valid[:, :, None, None], probs, 0.0)


# --- training: targets and loss ----------------------------------------------------------
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


def slot_buckets(num_positives: int, count: int) -> tuple[int, ...]:
    """The static slot counts the mask head may train on: P, P/2, ..., P/2^(count-1), ascending.

    Halving stops at 1 slot; duplicates are dropped (e.g. P = 2, count 3 -> (1, 2)).
    """
    sizes = {max(int(num_positives) >> i, 1) for i in range(max(int(count), 1))}
    return tuple(sorted(sizes))


def bucket_index(valid, buckets: tuple[int, ...]):
    """int32 scalar: the smallest of `buckets` (ascending) that holds every image's positives.

    valid: bool [B, P] (`select_positives`: each image's positives come first, so slots
    [:, :buckets[i]] hold them all when buckets[i] >= the largest count of any image).
    """
    most = jnp.max(jnp.sum(jnp.asarray(valid, jnp.int32), axis=-1))
    return jnp.sum(jnp.asarray(buckets, jnp.int32) < most).astype(jnp.int32)


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


def _crop_axis_weights(r1, r2, c1, c2, extent, *, out: int, crop: int, max_samples: int):
    """[N, out, crop] weights of torchvision's samples of each ROI bin on the crop's cells, along one axis.

    r1, r2: [N] ROI start/end (image pixels); c1, c2: [N] its ground truth's crop box;
    extent: [N] the image's size on this axis. Samples are torchvision's (aligned=False,
    adaptive: g = ceil(bin) per bin, here at most `max_samples`, positions
    r1 + p * bin + (i + 0.5) * bin / g, dropped outside [-1, extent], clamped into
    [0, extent - 1]); each is then read from the crop by linear interpolation between
    cell centres (cell j at x = c1 + (j + 0.5) * crop_w / crop). Divided by g.
    """
    length = jnp.maximum(r2 - r1, 1.0)
    bin_size = length / out
    grid = jnp.clip(jnp.ceil(bin_size), 1, max_samples)[:, None, None]
    p = jnp.arange(out, dtype=jnp.float32)[None, :, None]
    i = jnp.arange(max_samples, dtype=jnp.float32)[None, None, :]
    y = r1[:, None, None] + p * bin_size[:, None, None] + (i + 0.5) * bin_size[:, None, None] / grid
    extent = extent.astype(jnp.float32)[:, None, None]
    keep = (i < grid) & (y >= -1.0) & (y <= extent)
    y = jnp.clip(y, 0.0, extent - 1.0)  # torchvision: y <= 0 reads row 0, y >= extent - 1 the last row
    u = (y - c1[:, None, None]) * (crop / jnp.maximum(c2 - c1, 1e-6))[:, None, None] - 0.5  # crop cells
    cells = jnp.arange(crop, dtype=jnp.float32)
    hat = jnp.maximum(1.0 - jnp.abs(u[..., None] - cells), 0.0)  # [N, out, samples, crop]
    return jnp.sum(jnp.where(keep[..., None], hat, 0.0), axis=2) / grid


def mask_targets(
    rois, matched, valid, gt_masks, gt_mask_boxes, image_size, *, mask_size: int = 28, max_samples: int = 8
):
    """Each foreground ROI's M x M target from the host's S x S crops (approximates `mask_targets_full`).

    torchvision's sampling, read from the crop: every ROI bin averages g x g samples at
    torchvision's positions (g = ceil(roi size / M), capped at `max_samples`: exact up to
    ROIs of M x max_samples = 224 pixels, finer than the crop above), each sample's mask
    value interpolated linearly between the crop's cell centres (instead of between mask
    pixels). Separable: target = Ay @ crop @ Ax^T per ROI.

    Args:
      rois: [B, P, 4] float32 (x1, y1, x2, y2) foreground ROIs in the resized image's pixels.
      matched: int32 [B, P] each ROI's ground-truth row in 0..G-1.
      valid: bool [B, P]; invalid rows give zero targets.
      gt_masks: [B, G, S, S] crops: uint8 round(255 * value) as the pipeline batches them
        (`batch["gt_masks"]`), or float values in [0, 1].
      gt_mask_boxes: float32 [B, G, 4] their crop boxes (`batch["gt_mask_boxes"]`).
      image_size: int32 [B, 2] (h, w) of the resized images (`batch["image_size"]`): samples
        beyond it read zero, as in torchvision, whose masks have the resized image's size.
      mask_size: M (static); max_samples: the cap on samples per bin and axis (static).
    Returns:
      float32 [B, P, M, M] soft targets in [0, 1] (no threshold), gradient-free.
      Memory: 2 x B x P x M x max_samples x S float32 of sample weights at most (B = 2: 51 MB).
    """
    b, p = matched.shape
    g, s = gt_masks.shape[1], gt_masks.shape[-1]
    crops = jnp.asarray(gt_masks)
    crops = crops.astype(jnp.float32) / MASK_SCALE if crops.dtype == jnp.uint8 else crops.astype(jnp.float32)
    index = jnp.clip(jnp.asarray(matched, jnp.int32), 0, g - 1)
    crops = gather_rows(crops, index).reshape(b * p, s, s)
    boxes = gather_rows(jnp.asarray(gt_mask_boxes, jnp.float32), index).reshape(b * p, 4)
    rois = jnp.asarray(rois, jnp.float32).reshape(b * p, 4)
    hw = jnp.repeat(jnp.asarray(image_size, jnp.int32), p, axis=0)
    kw = dict(out=mask_size, crop=s, max_samples=int(max_samples))
    ay = _crop_axis_weights(rois[:, 1], rois[:, 3], boxes[:, 1], boxes[:, 3], hw[:, 0], **kw)
    ax = _crop_axis_weights(rois[:, 0], rois[:, 2], boxes[:, 0], boxes[:, 2], hw[:, 1], **kw)
    hi = jax.lax.Precision.HIGHEST
    out = jnp.einsum("nay,nyx,nbx->nab", ay, crops, ax, precision=hi)
    out = jax.lax.stop_gradient(jnp.clip(out.reshape(b, p, mask_size, mask_size), 0.0, 1.0))
    return jnp.where(valid[..., None, None], out, 0.0)


def mask_head_targets(
    roi_boxes,
    roi_labels,
    roi_valid,
    roi_matched,
    gt_masks,
    gt_mask_boxes,
    image_size,
    *,
    num_positives: int = 128,
    mask_size: int = 28,
    max_samples: int = 8,
):
    """The mask head's ROIs and targets from the box head's sampled ROIs (torchvision's `mask_proposals`).

    Args:
      roi_boxes: [B, R, 4] float32 sampled ROIs (resized image pixels); roi_labels: int32
        [B, R] (0 background); roi_valid: bool [B, R]; roi_matched: int32 [B, R] each ROI's
        ground-truth row (any value for background).
      gt_masks, gt_mask_boxes, image_size: the batch's crops, crop boxes and resized sizes
        (see `mask_targets`).
      num_positives: P (static); mask_size: M; max_samples: see `mask_targets`.
    Returns:
      dict: boxes [B, P, 4] float32, labels [B, P] int32, matched [B, P] int32, index [B, P]
      int32 (rows of the R sampled ROIs, e.g. to reuse C4's res5 features), valid [B, P]
      bool, targets [B, P, M, M] float32 (zero where invalid).
    """
    pos = select_positives(roi_labels, roi_valid, num_positives)
    boxes = jax.lax.stop_gradient(gather_rows(jnp.asarray(roi_boxes, jnp.float32), pos.index))
    labels = jnp.where(pos.valid, gather_rows(jnp.asarray(roi_labels, jnp.int32), pos.index), 0)
    matched = jnp.where(pos.valid, gather_rows(jnp.asarray(roi_matched, jnp.int32), pos.index), 0)
    targets = mask_targets(
        boxes, matched, pos.valid, gt_masks, gt_mask_boxes, image_size, mask_size=mask_size, max_samples=max_samples
    )
    return {
        "boxes": boxes,
        "labels": labels,
        "matched": matched,
        "index": pos.index,
        "valid": pos.valid,
        "targets": targets,
    }


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
    return label_mask_loss(picked, targets, valid)


def label_mask_loss(label_logits, targets, valid):
    """`mask_loss` from each ROI's label channel, already picked (`MaskRCNNPredictor(x, labels)`).

    Args:
      label_logits: [..., M, M] any float dtype; targets: float32 [..., M, M]; valid: bool [...].
    Returns:
      float32 scalar, as `mask_loss`.
    """
    picked = jnp.asarray(label_logits).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(picked, jnp.asarray(targets, jnp.float32))
    valid = jnp.asarray(valid, bool)
    total = jnp.sum(jnp.where(valid[..., None, None], bce, 0.0))
    count = jnp.sum(valid).astype(jnp.float32) * (picked.shape[-1] * picked.shape[-2])
    return total / jnp.maximum(count, 1.0)
