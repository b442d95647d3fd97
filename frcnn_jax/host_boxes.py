"""Host-side (numpy) box IoU, for code that runs without JAX (the data sources, the VOC metric).

The device-side op is `frcnn_jax.ops.box_iou` (jnp, [N, M]); this is its one numpy
counterpart, used by `data/shapes.py` (placing shapes) and `evaluation/voc.py` (matching).
"""

from __future__ import annotations

import numpy as np


def iou_one_to_many(box, boxes) -> np.ndarray:
    """IoU of one box with each of `boxes`.

    Args:
      box: [4] (x1, y1, x2, y2), width = x2 - x1 (no "+1").
      boxes: [M, 4] in the same convention (M may be 0).
    Returns:
      [M] IoU in the inputs' promoted float dtype; 0 where the union is 0.
    """
    box = np.asarray(box)
    boxes = np.asarray(boxes).reshape(-1, 4)
    iw = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0)
    ih = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
