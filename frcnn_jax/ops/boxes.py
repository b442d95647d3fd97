"""Box arithmetic: area, IoU, clipping, small-box masks and the box coder.

Boxes are `[..., 4]` arrays of (x1, y1, x2, y2) in pixels, with torchvision's
conventions: width = x2 - x1 (no "+1"). Arithmetic runs in float32 (bfloat16 and
float16 inputs are upcast, so pixel coordinates keep their precision) and results
are returned in the input's floating dtype.

All functions are pure, shape-static and work under `jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from frcnn_jax.ops import _checks

# torchvision's BoxCoder default: dw, dh are clamped here before exp().
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def compute_dtype(*arrays):
    """float32 for low-precision floats, the promoted dtype otherwise (float64 under x64)."""
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
        return jnp.float32
    return dtype


def _out_dtype(*arrays):
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def box_area(boxes):
    """Area of boxes.

    Args:
      boxes: [..., 4] float, (x1, y1, x2, y2).
    Returns:
      [...] area (x2 - x1) * (y2 - y1), in the input dtype. As in torchvision, inverted
      boxes are not clamped (an inverted box has a negative area).
    """
    _checks.check_rank("boxes", boxes, tuple(range(1, 8)), last_dim=4)
    b = jnp.asarray(boxes).astype(compute_dtype(boxes))
    return ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).astype(_out_dtype(boxes))


def _inter_union(a, b):
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.maximum(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[..., :, None] + area_b[..., None, :] - inter
    return inter, union


def box_iou(boxes1, boxes2):
    """Pairwise intersection-over-union.

    Args:
      boxes1: [N, 4] float (x1, y1, x2, y2).
      boxes2: [M, 4] float.
    Returns:
      [N, M] IoU in the promoted input dtype. Same formula as `torchvision.ops.box_iou`;
      where the union is 0 (two zero-area boxes) the IoU is 0 instead of torchvision's NaN.
    """
    _checks.check_rank("boxes1", boxes1, 2, last_dim=4)
    _checks.check_rank("boxes2", boxes2, 2, last_dim=4)
    dtype = compute_dtype(boxes1, boxes2)
    inter, union = _inter_union(jnp.asarray(boxes1, dtype), jnp.asarray(boxes2, dtype))
    iou = jnp.where(union != 0, inter / jnp.where(union != 0, union, 1), 0)
    return iou.astype(_out_dtype(boxes1, boxes2))


def clip_boxes(boxes, height, width):
    """Clips boxes to an image of `height` x `width` pixels.

    Args:
      boxes: [..., 4] float (x1, y1, x2, y2).
      height, width: Python numbers or scalar arrays (may be traced, e.g. a per-image
        true size carried through `jax.jit`); broadcastable against boxes[..., 0].
    Returns:
      [..., 4] boxes with x in [0, width] and y in [0, height], input dtype.
    """
    _checks.check_rank("boxes", boxes, tuple(range(1, 8)), last_dim=4)
    boxes = jnp.asarray(boxes)
    dtype = compute_dtype(boxes)
    b = boxes.astype(dtype)
    h = jnp.asarray(height, dtype)
    w = jnp.asarray(width, dtype)
    x1 = jnp.clip(b[..., 0], 0, w)
    y1 = jnp.clip(b[..., 1], 0, h)
    x2 = jnp.clip(b[..., 2], 0, w)
    y2 = jnp.clip(b[..., 3], 0, h)
    return jnp.stack([x1, y1, x2, y2], axis=-1).astype(_out_dtype(boxes))


def small_box_mask(boxes, min_size):
    """Marks boxes too small to keep.

    Args:
      boxes: [..., 4] float (x1, y1, x2, y2).
      min_size: minimum width and height in pixels (>= 0).
    Returns:
      [...] bool, True where width < min_size or height < min_size: exactly the boxes
      that `torchvision.ops.remove_small_boxes(boxes, min_size)` removes. NaN boxes
      are marked small too.
    """
    _checks.check_rank("boxes", boxes, tuple(range(1, 8)), last_dim=4)
    _checks.check_number("min_size", min_size, minimum=0)
    b = jnp.asarray(boxes).astype(compute_dtype(boxes))
    ws = b[..., 2] - b[..., 0]
    hs = b[..., 3] - b[..., 1]
    return ~((ws >= min_size) & (hs >= min_size))


def _check_weights(weights: Sequence[float]):
    if len(weights) != 4:
        raise ValueError(f"weights must have 4 entries (wx, wy, ww, wh), got {weights!r}")
    for w in weights:
        _checks.check_number("weights", w, minimum=0, allow_traced=False)
        if w == 0:
            raise ValueError(f"weights must be positive, got {weights!r}")


def encode_boxes(boxes, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
    """Regression targets that turn `anchors` into `boxes` (torchvision `BoxCoder.encode`).

    Args:
      boxes: [..., 4] float, target boxes (e.g. matched ground truth).
      anchors: [..., 4] float, reference boxes (anchors or proposals); broadcastable
        against `boxes`.
      weights: (wx, wy, ww, wh) static positive scales: RPN (1, 1, 1, 1), box head
        (10, 10, 5, 5).
    Returns:
      [..., 4] deltas (dx, dy, dw, dh): dx = wx * (cx - cx_a) / w_a,
      dw = ww * log(w / w_a), in the promoted input dtype.
    """
    _checks.check_rank("boxes", boxes, tuple(range(1, 8)), last_dim=4)
    _checks.check_rank("anchors", anchors, tuple(range(1, 8)), last_dim=4)
    _check_weights(weights)
    dtype = compute_dtype(boxes, anchors)
    b = jnp.asarray(boxes, dtype)
    a = jnp.asarray(anchors, dtype)
    w = jnp.asarray(weights, dtype)
    # (x, y) pairs side by side: one vectorised pass over [..., 2] halves.
    ex_wh = a[..., 2:] - a[..., :2]
    ex_ctr = a[..., :2] + 0.5 * ex_wh
    gt_wh = b[..., 2:] - b[..., :2]
    gt_ctr = b[..., :2] + 0.5 * gt_wh
    d_ctr = w[:2] * (gt_ctr - ex_ctr) / ex_wh
    d_wh = w[2:] * jnp.log(gt_wh / ex_wh)
    return jnp.concatenate([d_ctr, d_wh], axis=-1).astype(_out_dtype(boxes, anchors))


def decode_boxes(
    deltas,
    anchors,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_SCALE_CLAMP,
):
    """Applies regression deltas to anchors (torchvision `BoxCoder.decode_single`).

    Args:
      deltas: [..., 4] float (dx, dy, dw, dh). For class-specific deltas [R, C * 4],
        reshape to [R, C, 4] and pass anchors as [R, 1, 4].
      anchors: [..., 4] float reference boxes, broadcastable against `deltas`.
      weights: (wx, wy, ww, wh) static positive scales, as in `encode_boxes`.
      clip: dw / ww and dh / wh are clamped to at most this before exp()
        (default log(1000 / 16)).
    Returns:
      [..., 4] boxes (x1, y1, x2, y2) in the promoted input dtype.
    """
    _checks.check_rank("deltas", deltas, tuple(range(1, 8)), last_dim=4)
    _checks.check_rank("anchors", anchors, tuple(range(1, 8)), last_dim=4)
    _check_weights(weights)
    _checks.check_number("clip", clip)
    dtype = compute_dtype(deltas, anchors)
    d = jnp.asarray(deltas, dtype)
    a = jnp.asarray(anchors, dtype)
    w = jnp.asarray(weights, dtype)

    wh = a[..., 2:] - a[..., :2]
    ctr = a[..., :2] + 0.5 * wh
    d_ctr = d[..., :2] / w[:2]
    d_wh = jnp.minimum(d[..., 2:] / w[2:], clip)
    pred_ctr = d_ctr * wh + ctr
    half = 0.5 * (jnp.exp(d_wh) * wh)
    out = jnp.concatenate([pred_ctr - half, pred_ctr + half], axis=-1)
    return out.astype(_out_dtype(deltas, anchors))
