"""ROI feature pooling: one level for C4, torchvision's MultiScaleRoIAlign for FPN."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from frcnn_jax import ops


def infer_scale(feature_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> float:
    """torchvision's scale inference: 2 ** round(log2(feature_h / canvas_h))."""
    return 2.0 ** round(math.log2(feature_hw[0] / canvas_hw[0]))


def fpn_levels(boxes, k_min: int = 2, k_max: int = 5, canonical_scale: float = 224.0, canonical_level: int = 4):
    """torchvision `LevelMapper`: level index (0-based from k_min) of each box.

    boxes: [..., 4] -> [...] int32 in [0, k_max - k_min];
    floor(4 + log2(sqrt(area) / 224) + 1e-6) clamped to [2, 5], minus 2.
    """
    s = jnp.sqrt(ops.box_area(boxes).astype(jnp.float32))
    lvl = jnp.floor(canonical_level + jnp.log2(s / canonical_scale) + jnp.float32(1e-6))
    lvl = jnp.clip(lvl, k_min, k_max)
    return (lvl - k_min).astype(jnp.int32)


def pool_rois(
    features: Sequence[jax.Array],
    boxes,
    canvas_hw: tuple[int, int],
    *,
    output_size: int,
    sampling_ratio: int,
    aligned: bool,
    multiscale: bool,
):
    """Pools every proposal of every image.

    Args:
      features: C4: [feature [B, H, W, C]]; FPN: [P2, P3, P4, P5] (P6 is not pooled).
      boxes: [B, P, 4] proposals in canvas pixels.
      canvas_hw: static padded image size (scales are inferred from it, as torchvision does).
      multiscale: FPN level assignment by box size; otherwise every box reads features[0].
    Returns:
      [B * P, S, S, C] pooled features, image-major (row b * P + p).
    """
    b, p, _ = boxes.shape
    flat = boxes.reshape(b * p, 4)
    batch_idx = jnp.repeat(jnp.arange(b, dtype=jnp.int32), p)
    scales = [infer_scale(f.shape[1:3], canvas_hw) for f in features]
    if multiscale:
        levels = fpn_levels(flat, k_min=round(-math.log2(scales[0])), k_max=round(-math.log2(scales[-1])))
    else:
        levels = jnp.zeros((b * p,), jnp.int32)
    return ops.multilevel_roi_align(features, scales, flat, batch_idx, levels, output_size, sampling_ratio, aligned)


@dataclasses.dataclass(frozen=True)
class RoIPooler:
    """A stage's pooler, chosen once per architecture (`architectures.py`) and called with plain arrays.

    num_levels: how many of the backbone's maps it reads: 1 (C4: the stride-16 map, every
    box on it) or 4 (FPN: P2-P5, torchvision's MultiScaleRoIAlign level per box).
    """

    num_levels: int
    resolution: int
    sampling_ratio: int
    aligned: bool = False

    def __call__(self, features: Sequence[jax.Array], boxes, canvas_hw: tuple[int, int]):
        """features: the backbone's NHWC maps; boxes [B, P, 4] canvas pixels -> [B * P, S, S, C] (image-major)."""
        return pool_rois(
            features[: self.num_levels],
            boxes,
            canvas_hw,
            output_size=self.resolution,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            multiscale=self.num_levels > 1,
        )
