"""Proposal/anchor to ground-truth matching (torchvision / maskrcnn-benchmark `Matcher`)."""

from __future__ import annotations

import jax.numpy as jnp

BELOW_LOW_THRESHOLD = -1  # background
BETWEEN_THRESHOLDS = -2  # ignored


def match(iou, gt_valid, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool):
    """Assigns every prediction (anchor or proposal) the ground truth it overlaps most.

    Args:
      iou: [G, N] IoU of each (padded) ground-truth box with each prediction.
      gt_valid: [G] bool; padded or ignored (e.g. crowd) ground truth never matches.
      high_threshold: IoU >= this is a match (RPN 0.7, box head 0.5).
      low_threshold: IoU < this is background (RPN 0.3, box head 0.5).
      allow_low_quality_matches: also match each ground truth's best prediction(s),
        including ties, to the ground truth they overlap most (torchvision semantics).
    Returns:
      [N] int32: index of the matched ground truth, -1 (background) or -2 (ignored).
      With no valid ground truth every prediction is background.
    """
    iou = jnp.where(gt_valid[:, None], iou, -1.0)
    matched_vals = jnp.max(iou, axis=0)
    all_matches = jnp.argmax(iou, axis=0).astype(jnp.int32)
    matches = jnp.where(matched_vals < low_threshold, BELOW_LOW_THRESHOLD, all_matches)
    matches = jnp.where((matched_vals >= low_threshold) & (matched_vals < high_threshold), BETWEEN_THRESHOLDS, matches)
    if allow_low_quality_matches:
        highest = jnp.max(iou, axis=1)  # [G] best IoU of each ground truth
        is_best = (iou == highest[:, None]) & gt_valid[:, None]
        matches = jnp.where(jnp.any(is_best, axis=0), all_matches, matches)
    return matches.astype(jnp.int32)
