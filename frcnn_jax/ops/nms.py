"""Greedy non-maximum suppression with static shapes, in tiles.

The result equals torchvision's greedy NMS (same kept set, same order), computed
without any data-dependent shape and without holding an N x N IoU matrix:

* boxes are sorted by decreasing score (invalid boxes last) and cut into tiles of T;
* each tile is first tested against the boxes kept so far, which live in a compact
  buffer of at most `max_output` boxes, T at a time;
* the survivors of a tile then suppress each other: "i is kept iff no kept j < i in the
  tile overlaps it" is solved by fixed-point iteration, which reaches the greedy
  answer exactly (entry i is final once entries < i are; the fixed point is unique);
* the loop stops as soon as `max_output` boxes are kept or the valid boxes run out.

Memory is O(T * T + N); work is O(N * kept), the same order as the scalar loop but
vectorised over T * T blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import _checks
from frcnn_jax.ops.boxes import compute_dtype


def _threshold(iou_threshold, dtype):
    """Threshold t in the IoU's dtype such that (x > t) == (x > iou_threshold in float64).

    torchvision compares the float32 IoU with a double threshold; rounding the
    threshold down to float32 preserves that comparison for every float32 IoU.
    float64 IoUs (float64 boxes under `jax_enable_x64`) compare with the double itself.
    """
    if isinstance(iou_threshold, jax.core.Tracer) or dtype != jnp.float32:
        return jnp.asarray(iou_threshold, dtype)
    t = float(iou_threshold)
    t32 = np.float32(t)
    if float(t32) > t:
        t32 = np.nextafter(t32, np.float32(-np.inf))
    return jnp.float32(t32)


def _block_sizes(n: int) -> tuple[int, int]:
    """(tile, chunk): boxes decided per outer step, kept boxes tested per inner step.

    Chosen by measurement on CPU: small blocks waste no work on short inputs; larger
    chunks amortise the loop for long ones.
    """
    if n <= 2048:
        return 32, 128
    return 64, 256


def _overlaps(kept, kept_area, cand_t, cand_area, thr):
    """[K, T] bool: IoU(kept_k, cand_t) > thr with torchvision's CPU formula, in the boxes' dtype.

    kept: [K, 4] boxes; cand_t: [4, T] boxes, coordinate-major, so the reduction over
    kept boxes runs along the major axis and the candidates vectorise.
    """
    w = jnp.maximum(jnp.minimum(kept[:, 2:3], cand_t[2][None]) - jnp.maximum(kept[:, 0:1], cand_t[0][None]), 0)
    h = jnp.maximum(jnp.minimum(kept[:, 3:4], cand_t[3][None]) - jnp.maximum(kept[:, 1:2], cand_t[1][None]), 0)
    inter = w * h
    # 0 / 0 (two empty boxes) is NaN and NaN > thr is False, as in torchvision.
    return inter / (kept_area[:, None] + cand_area[None, :] - inter) > thr


def _greedy_nms(boxes, scores, classes, valid, thr, max_output: int):
    """Core loop. boxes [N, 4] f32 (f64), scores [N] f32 (f64), classes [N] int32 or None, valid [N] bool."""
    n = boxes.shape[0]
    tile, chunk = _block_sizes(n)
    valid = valid & ~jnp.isnan(scores)
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    n_valid = jnp.sum(valid, dtype=jnp.int32)

    padded = -(-n // tile) * tile
    sorted_boxes = jnp.zeros((padded, 4), boxes.dtype).at[:n].set(boxes[order])
    sorted_area = (sorted_boxes[:, 2] - sorted_boxes[:, 0]) * (sorted_boxes[:, 3] - sorted_boxes[:, 1])
    sorted_boxes_t = sorted_boxes.T
    use_classes = classes is not None
    sorted_cls = jnp.full((padded,), -1, jnp.int32).at[:n].set(classes[order]) if use_classes else None
    capacity = -(-max_output // chunk) * chunk
    lane = jnp.arange(tile, dtype=jnp.int32)
    chunk_lane = jnp.arange(chunk, dtype=jnp.int32)
    earlier = lane[:, None] < lane[None, :]  # [j, i]: j comes before i

    def overlaps(kept, kept_area, kept_cls, cand_t, cand_area, cand_cls):
        over = _overlaps(kept, kept_area, cand_t, cand_area, thr)
        if use_classes:
            over &= kept_cls[:, None] == cand_cls[None, :]
        return over

    def outer_cond(state):
        t, count = state[0], state[1]
        return (t * tile < n_valid) & (count < max_output)

    def outer_body(state):
        t, count, kept_boxes, kept_area, kept_cls, kept_pos = state
        start = t * tile
        cand_t = jax.lax.dynamic_slice_in_dim(sorted_boxes_t, start, tile, axis=1)
        cand_area = jax.lax.dynamic_slice_in_dim(sorted_area, start, tile)
        cand_cls = jax.lax.dynamic_slice_in_dim(sorted_cls, start, tile) if use_classes else None
        alive = start + lane < n_valid

        # 1. Suppression by the boxes kept in earlier tiles (compact buffer, a chunk at a time).
        def chunk_cond(c_sup):
            return c_sup[0] * chunk < count

        def chunk_body(c_sup):
            c, sup = c_sup
            at = c * chunk
            over = overlaps(
                jax.lax.dynamic_slice_in_dim(kept_boxes, at, chunk),
                jax.lax.dynamic_slice_in_dim(kept_area, at, chunk),
                jax.lax.dynamic_slice_in_dim(kept_cls, at, chunk) if use_classes else None,
                cand_t,
                cand_area,
                cand_cls,
            )
            over &= (at + chunk_lane < count)[:, None]
            return c + 1, sup | jnp.any(over, axis=0)

        _, sup = jax.lax.while_loop(chunk_cond, chunk_body, (jnp.int32(0), jnp.zeros((tile,), bool)))
        alive &= ~sup

        # 2. Suppression inside the tile: fixed point of keep = alive & ~any(earlier kept overlaps).
        self_over = overlaps(cand_t.T, cand_area, cand_cls, cand_t, cand_area, cand_cls) & earlier

        def fp_cond(carry):
            return carry[1]

        def fp_body(carry):
            keep, _ = carry
            new = alive & ~jnp.any(self_over & keep[:, None], axis=0)
            return new, jnp.any(new != keep)

        keep, _ = jax.lax.while_loop(fp_cond, fp_body, (alive, jnp.bool_(True)))

        # 3. Append this tile's kept boxes to the compact buffers.
        pos = count + jnp.cumsum(keep, dtype=jnp.int32) - 1
        slot = jnp.where(keep, pos, capacity)  # out of range -> dropped
        kept_boxes = kept_boxes.at[slot].set(cand_t.T, mode="drop")
        kept_area = kept_area.at[slot].set(cand_area, mode="drop")
        if use_classes:
            kept_cls = kept_cls.at[slot].set(cand_cls, mode="drop")
        out_slot = jnp.where(keep & (pos < max_output), pos, max_output)
        kept_pos = kept_pos.at[out_slot].set(start + lane, mode="drop")
        count = count + jnp.sum(keep, dtype=jnp.int32)
        return t + 1, count, kept_boxes, kept_area, kept_cls, kept_pos

    state = (
        jnp.int32(0),
        jnp.int32(0),
        jnp.zeros((capacity, 4), boxes.dtype),
        jnp.zeros((capacity,), boxes.dtype),
        jnp.zeros((capacity if use_classes else 1,), jnp.int32),
        jnp.full((max_output,), -1, jnp.int32),
    )
    kept_pos = jax.lax.while_loop(outer_cond, outer_body, state)[-1]
    return jnp.where(kept_pos >= 0, order[jnp.maximum(kept_pos, 0)], -1).astype(jnp.int32)


def _prepare(boxes, scores, iou_threshold, max_output, valid):
    _checks.check_rank("boxes", boxes, 2, last_dim=4)
    _checks.check_rank("scores", scores, 1)
    _checks.check_same_leading(("boxes", "scores"), boxes, scores)
    _checks.check_float("boxes", boxes)
    _checks.check_float("scores", scores)
    _checks.check_number("iou_threshold", iou_threshold, minimum=0)
    _checks.check_number("max_output", max_output, minimum=1, integer=True, allow_traced=False)
    _checks.check_finite_boxes("boxes", boxes)
    n = np.shape(boxes)[0]
    if valid is None:
        valid = jnp.ones((n,), bool)
    else:
        _checks.check_rank("valid", valid, 1)
        _checks.check_same_leading(("boxes", "valid"), boxes, valid)
        valid = jnp.asarray(valid).astype(bool)
    # float32 (float64 inputs, under jax_enable_x64, keep float64 as in torchvision)
    boxes = jnp.asarray(boxes).astype(compute_dtype(boxes))
    return boxes, jnp.asarray(scores).astype(compute_dtype(scores)), valid


def nms(boxes, scores, iou_threshold: float, max_output: int, valid=None):
    """Greedy NMS, static shapes: same kept set and order as `torchvision.ops.nms`.

    Args:
      boxes: [N, 4] float32/bfloat16 (x1, y1, x2, y2). N may be 0. IoUs are computed in
        float32, or in float64 for float64 boxes (only under `jax_enable_x64`).
      scores: [N] float; higher is better. Ties are broken by lower index first.
      iou_threshold: a box is suppressed by a kept, higher-scored box when their IoU is
        strictly greater than this (>= 0; may be traced).
      max_output: static int >= 1, length of the result.
      valid: optional [N] bool; invalid rows (padding) are never kept and suppress
        nothing. NaN scores count as invalid.
    Returns:
      [max_output] int32 indices into `boxes` of the kept boxes in decreasing score
      order, padded with -1: torchvision's `nms(...)[:max_output]`.
    """
    boxes, scores, valid = _prepare(boxes, scores, iou_threshold, max_output, valid)
    if boxes.shape[0] == 0:
        return jnp.full((max_output,), -1, jnp.int32)
    return _greedy_nms(boxes, scores, None, valid, _threshold(iou_threshold, boxes.dtype), int(max_output))


def batched_nms(boxes, scores, class_ids, iou_threshold: float, max_output: int, valid=None):
    """Per-class greedy NMS: same result as `torchvision.ops.batched_nms`.

    Boxes only suppress boxes of the same class; the kept indices of all classes come
    out together in decreasing score order.

    Args:
      boxes: [N, 4] float (x1, y1, x2, y2).
      scores: [N] float.
      class_ids: [N] int, class (or FPN level) of each box.
      iou_threshold, max_output, valid: as in `nms`.
    Returns:
      [max_output] int32 kept indices in decreasing score order, padded with -1.
    """
    boxes, scores, valid = _prepare(boxes, scores, iou_threshold, max_output, valid)
    _checks.check_rank("class_ids", class_ids, 1)
    _checks.check_same_leading(("boxes", "class_ids"), boxes, class_ids)
    if not jnp.issubdtype(jnp.result_type(class_ids), jnp.integer):
        raise ValueError(f"class_ids must be an integer array, got {jnp.result_type(class_ids)}")
    if boxes.shape[0] == 0:
        return jnp.full((max_output,), -1, jnp.int32)
    classes = jnp.asarray(class_ids).astype(jnp.int32)
    return _greedy_nms(boxes, scores, classes, valid, _threshold(iou_threshold, boxes.dtype), int(max_output))
