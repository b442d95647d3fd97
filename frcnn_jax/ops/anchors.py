"""Anchor generation with torchvision `AnchorGenerator` ordering and rounding.

Anchors depend only on static shapes, so they are computed once with NumPy at trace
time and enter the compiled program as a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import _checks


def _as_pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or an (h, w) pair, got {value!r}")
    for v in pair:
        _checks.check_number(name, v, minimum=1, integer=True, allow_traced=False)
    return int(pair[0]), int(pair[1])


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
    """The A = len(aspect_ratios) * len(sizes) anchors centred on (0, 0).

    Index a = ratio_index * len(sizes) + size_index, exactly as torchvision orders them.
    Aspect ratio is height / width; coordinates are rounded half-to-even like torch.round.

    Returns:
      [A, 4] float32 numpy array (x1, y1, x2, y2).
    """
    if len(sizes) == 0 or len(aspect_ratios) == 0:
        raise ValueError(f"sizes and aspect_ratios must be non-empty, got {sizes!r}, {aspect_ratios!r}")
    for s in sizes:
        _checks.check_number("sizes", s, minimum=0, allow_traced=False)
    for r in aspect_ratios:
        _checks.check_number("aspect_ratios", r, minimum=0, allow_traced=False)
        if r == 0:
            raise ValueError(f"aspect_ratios must be positive, got {aspect_ratios!r}")
    scales = np.asarray(sizes, np.float32)
    ratios = np.asarray(aspect_ratios, np.float32)
    h_ratios = np.sqrt(ratios)
    w_ratios = np.float32(1) / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
    return np.round(base).astype(np.float32)


def generate_anchors_np(
    feature_hw: tuple[int, int],
    stride,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
) -> np.ndarray:
    """NumPy version of `generate_anchors` (same values), for host-side code."""
    fh, fw = _as_pair("feature_hw", feature_hw)
    sh, sw = _as_pair("stride", stride)
    base = cell_anchors(sizes, aspect_ratios)
    shifts_x = np.arange(fw, dtype=np.int32) * sw
    shifts_y = np.arange(fh, dtype=np.int32) * sh
    shift_y, shift_x = np.meshgrid(shifts_y, shifts_x, indexing="ij")
    shift_x = shift_x.reshape(-1).astype(np.float32)
    shift_y = shift_y.reshape(-1).astype(np.float32)
    shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def generate_anchors(
    feature_hw: tuple[int, int],
    stride,
    sizes: Sequence[float],
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
):
    """Anchors for every cell of one feature map.

    Args:
      feature_hw: static (H, W) of the feature map.
      stride: int or (stride_h, stride_w) in pixels. torchvision derives it as
        padded image size // feature size per axis.
      sizes: anchor sizes in pixels (sqrt of the area), e.g. (32, 64, 128, 256, 512).
      aspect_ratios: height / width ratios, e.g. (0.5, 1.0, 2.0).
    Returns:
      [H * W * A, 4] float32 (x1, y1, x2, y2); row (y * W + x) * A + a is anchor a of
      cell (y, x), the same index as in torchvision and as a NHWC RPN head output
      reshaped to [H * W * A]. Multi-level (FPN) use: call once per level, concatenate.
    """
    return jnp.asarray(generate_anchors_np(feature_hw, stride, sizes, aspect_ratios))
