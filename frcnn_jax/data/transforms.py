"""Host-side (numpy) image and target transforms, with torchvision's conventions.

Images are `[H, W, C]` arrays (HWC, RGB); boxes are `[N, 4]` float32 (x1, y1, x2, y2) in
pixels (width = x2 - x1, no "+1"). Sizes are `(h, w)` pairs.

The resize reproduces torchvision's `GeneralizedRCNNTransform`: the scale is
`min(min_size / min(h, w), max_size / max(h, w))`, the output size is
`floor(h * scale), floor(w * scale)` and the image is sampled bilinearly with
`align_corners=False` at the ratio recomputed from the integer sizes (what
`F.interpolate(..., scale_factor=scale, recompute_scale_factor=True)` does). It is
separable: one gather of two rows per output row, then one gather of two columns per
output column, each weighted; the sampling positions are computed in float32 with a
fused multiply-add exactly like torch's CPU kernel, so results agree with torch to
float32 rounding (~2e-7 on a 0..1 image).

Normalisation follows torchvision: RGB / 255, then ImageNet mean/std. The padded canvas
holds zeros after normalisation, image at the top-left (what torchvision's `batch_images`
does, with a fixed canvas instead of the batch's maximum size).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# torchvision's detection defaults (ImageNet statistics, RGB, on a 0..1 scale).
IMAGE_MEAN = (0.485, 0.456, 0.406)
IMAGE_STD = (0.229, 0.224, 0.225)


def resized_hw(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """Output size of `resize_image` for an input of `height` x `width` pixels.

    scale = min(min_size / min(h, w), max_size / max(h, w)) in double precision (as
    torchvision's eager path), size = (floor(h * scale), floor(w * scale)).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got (h, w)=({height}, {width})")
    if min_size < 1 or max_size < 1:
        raise ValueError(f"min_size and max_size must be >= 1, got min_size={min_size}, max_size={max_size}")
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def _linear_taps(in_size: int, out_size: int):
    """Bilinear (align_corners=False) taps along one axis, as torch's CPU kernel computes them.

    Returns (i0, i1, w0, w1): int64 [out] source indices and float32 [out] weights, so that
    out[j] = w0[j] * in[i0[j]] + w1[j] * in[i1[j]].
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centers = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # torch evaluates scale * (dst + 0.5) - 0.5 in float32 as one fused multiply-add:
    # the float64 product of two float32 values is exact, so this rounds once like an FMA.
    src = (centers.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    w1 = src - i0.astype(np.float32)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(image, out_hw: tuple[int, int]):
    """Bilinear resize to an explicit size, torch `F.interpolate(mode="bilinear", align_corners=False)`.

    Args:
      image: [H, W, C] (or [H, W]) uint8 or float array.
      out_hw: (h', w') output size, each >= 1.
    Returns:
      float32 [h', w', C] (or [h', w']) in the input's value range (no rescaling of uint8).
      No antialiasing when shrinking (like torch's default). Same-size inputs are returned
      as an exact float32 copy.
    """
    image = np.asarray(image)
    if image.ndim not in (2, 3):
        raise ValueError(f"image must be [H, W] or [H, W, C], got shape {image.shape}")
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"out_hw must be >= 1, got {out_hw}")
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    if (oh, ow) == (h, w):
        return image.astype(np.float32, copy=True)
    flat = image.reshape(h, w * c)
    y0, y1, wy0, wy1 = _linear_taps(h, oh)
    rows = flat[y0].astype(np.float32)  # [oh, W*C]
    rows *= wy0[:, None]
    rows1 = flat[y1].astype(np.float32)
    rows1 *= wy1[:, None]
    rows += rows1
    x0, x1, wx0, wx1 = _linear_taps(w, ow)
    ch = np.arange(c)
    cols0 = (x0[:, None] * c + ch).ravel()  # channel-interleaved column indices [ow*C]
    cols1 = (x1[:, None] * c + ch).ravel()
    out = np.take(rows, cols0, axis=1)
    out *= np.repeat(wx0, c)
    out1 = np.take(rows, cols1, axis=1)
    out1 *= np.repeat(wx1, c)
    out += out1
    return out.reshape((oh, ow, c) if image.ndim == 3 else (oh, ow))


def resize_image(image, min_size: int, max_size: int):
    """Resizes like torchvision's `GeneralizedRCNNTransform` (short side to min_size, long side <= max_size).

    Args:
      image: [H, W, C] uint8 or float array.
      min_size, max_size: target short side and cap on the long side (pixels).
    Returns:
      (resized, (h', w')): float32 [h', w', C] in the input's value range, and its size
      (`resized_hw(H, W, min_size, max_size)`).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    out_hw = resized_hw(image.shape[0], image.shape[1], min_size, max_size)
    return resize_bilinear(image, out_hw), out_hw


def resize_boxes(boxes, orig_hw: tuple[int, int], new_hw: tuple[int, int]):
    """Scales boxes from an image of size orig_hw to new_hw, torchvision `resize_boxes`.

    The project's one box rescaler: the pipeline resizes targets with it, and the detector
    and the evaluation map detections from the resized image back to the original pixels
    (`resize_boxes(boxes, image_size, orig_size)`).

    Args:
      boxes: [N, 4] (x1, y1, x2, y2).
      orig_hw, new_hw: (h, w) sizes.
    Returns:
      float32 [N, 4]: x scaled by new_w / orig_w, y by new_h / orig_h (ratios in float32).
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    rh = np.float32(new_hw[0]) / np.float32(orig_hw[0])
    rw = np.float32(new_hw[1]) / np.float32(orig_hw[1])
    return boxes * np.array([rw, rh, rw, rh], np.float32)


def hflip(image, boxes):
    """Horizontal flip of an image and its boxes.

    Args:
      image: [H, W, C] array.
      boxes: [N, 4] (x1, y1, x2, y2) in the image's pixels.
    Returns:
      (image[:, ::-1] (a view), float32 [N, 4] boxes with x1' = W - x2, x2' = W - x1).
    """
    image = np.asarray(image)
    width = np.float32(image.shape[1])
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    flipped = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
    return image[:, ::-1], flipped


def _normalize_coefficients():
    std = np.asarray(IMAGE_STD, np.float32)
    return np.float32(1.0 / 255.0) / std, np.asarray(IMAGE_MEAN, np.float32) / std


def normalize(image, out=None):
    """torchvision normalisation: (image / 255 - mean) / std per RGB channel.

    Args:
      image: [..., 3] uint8 or float array on a 0..255 scale.
      out: optional float32 array of the same shape to write into (may be `image` itself
        when it is float32).
    Returns:
      float32 [..., 3].
    """
    image = np.asarray(image)
    if image.shape[-1] != 3:
        raise ValueError(f"image must have 3 (RGB) channels in the last axis, got shape {image.shape}")
    scale, offset = _normalize_coefficients()
    out = np.multiply(image, scale, out=out, dtype=np.float32)
    out -= offset
    return out


def check_canvases(canvases: Sequence[Sequence[int]], multiple: int = 32) -> tuple[tuple[int, int], ...]:
    """Validates a list of canvas sizes (H, W), each a positive multiple of `multiple`."""
    result = []
    for canvas in canvases:
        if len(canvas) != 2:
            raise ValueError(f"each canvas must be (H, W), got {canvas!r}")
        ch, cw = int(canvas[0]), int(canvas[1])
        if ch < 1 or cw < 1 or ch % multiple or cw % multiple:
            raise ValueError(f"canvas (H, W)=({ch}, {cw}) must be positive multiples of {multiple}")
        result.append((ch, cw))
    if not result:
        raise ValueError("canvases must name at least one (H, W) size")
    return tuple(result)


def check_canvases_cover(canvases: Sequence[Sequence[int]], min_size, max_size: int) -> None:
    """Raises ValueError unless every image, resized by the rule, fits some canvas.

    The resize rule (`resized_hw`) gives a short side <= min_size and a long side <=
    max_size, and reaches (min(s, max_size), max_size) for the aspect ratio
    max_size / s (s = the largest of `min_size`, an int or a sequence of them). The
    canvases hold every resized image exactly when one holds that landscape shape
    and one its portrait transpose.

    Raises:
      ValueError: "no canvas holds a landscape image resized to (h, w)=(800, 1333)
      (min_size 800, max_size 1333); add a canvas of at least (800, 1344)".
    """
    sizes = [int(min_size)] if np.isscalar(min_size) else [int(s) for s in min_size]
    short, long = min(max(sizes), int(max_size)), int(max_size)
    for name, (h, w) in (("landscape", (short, long)), ("portrait", (long, short))):
        if not any(int(ch) >= h and int(cw) >= w for ch, cw in canvases):
            need = (-(-h // 32) * 32, -(-w // 32) * 32)
            raise ValueError(
                f"no canvas holds a {name} image resized to (h, w)=({h}, {w}) (min_size {max(sizes)}, max_size "
                f"{long}); add a canvas of at least {need}"
            )


def choose_canvas(height: int, width: int, canvases: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The smallest-area canvas (H, W) with H >= height and W >= width (first one on ties).

    Raises:
      ValueError naming the image size and the canvases when none contains the image.
    """
    best = None
    for ch, cw in canvases:
        if ch >= height and cw >= width and (best is None or ch * cw < best[0] * best[1]):
            best = (int(ch), int(cw))
    if best is None:
        raise ValueError(
            f"no canvas holds a resized image of (h, w)=({height}, {width}); canvases (H, W): "
            f"{[tuple(c) for c in canvases]}. Add a canvas at least that large (multiples of 32)."
        )
    return best


def pad_to_canvas(image, canvas_hw: tuple[int, int]):
    """Places an image at the top-left of a zero canvas.

    Args:
      image: [h, w, C] array (normalised already: padding is 0 after normalisation).
      canvas_hw: (H, W) with H >= h, W >= w.
    Returns:
      float32 [H, W, C].
    """
    image = np.asarray(image)
    h, w = image.shape[:2]
    if h > canvas_hw[0] or w > canvas_hw[1]:
        raise ValueError(f"image of (h, w)=({h}, {w}) does not fit the canvas {tuple(canvas_hw)}")
    out = np.zeros((int(canvas_hw[0]), int(canvas_hw[1])) + image.shape[2:], np.float32)
    out[:h, :w] = image
    return out


def pad_targets(boxes, labels, is_crowd, max_gt: int, *, difficult=None, image_id=None):
    """Pads (or truncates) ground truth to a fixed number of rows.

    Args:
      boxes: [N, 4] float; labels: [N] int; is_crowd: [N] bool; difficult: optional [N] bool.
      max_gt: number of rows G of the outputs (>= 1).
      image_id: only used in the truncation warning.
    Returns:
      dict of "boxes" float32 [G, 4] (zeros in padding), "labels" int32 [G] (0 in
      padding), "is_crowd" bool [G], "difficult" bool [G], "gt_valid" bool [G] (True for
      the real rows). With N > G the first G rows are kept and a warning naming the image
      id and N is logged.
    """
    if max_gt < 1:
        raise ValueError(f"max_gt must be >= 1, got {max_gt}")
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    if n > max_gt:
        logger.warning("image %s has %d ground-truth boxes; keeping the first max_gt=%d", image_id, n, max_gt)
    k = min(n, max_gt)
    out = {
        "boxes": np.zeros((max_gt, 4), np.float32),
        "labels": np.zeros((max_gt,), np.int32),
        "is_crowd": np.zeros((max_gt,), bool),
        "difficult": np.zeros((max_gt,), bool),
        "gt_valid": np.zeros((max_gt,), bool),
    }
    out["boxes"][:k] = boxes[:k]
    out["labels"][:k] = np.asarray(labels).reshape(-1)[:k]
    out["is_crowd"][:k] = np.asarray(is_crowd, bool).reshape(-1)[:k]
    if difficult is not None:
        out["difficult"][:k] = np.asarray(difficult, bool).reshape(-1)[:k]
    out["gt_valid"][:k] = True
    return out
