"""Pure, jit-compatible detection ops with static shapes.

Boxes are [..., 4] (x1, y1, x2, y2) in pixels (torchvision conventions, no "+1");
feature maps are NHWC.
"""

from frcnn_jax.ops.anchors import cell_anchors, generate_anchors
from frcnn_jax.ops.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    small_box_mask,
)
from frcnn_jax.ops.nms import batched_nms, nms
from frcnn_jax.ops.roi_align import multilevel_roi_align, roi_align

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "cell_anchors",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "generate_anchors",
    "multilevel_roi_align",
    "nms",
    "roi_align",
    "small_box_mask",
]
