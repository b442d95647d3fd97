"""Host-side (numpy) instance-mask pasting: torchvision's `paste_masks_in_image`, bounded.

A Mask R-CNN head predicts an M x M probability map per detection (M = 28 FPN, 14 C4)
in the box's frame. Pasting it into the original image follows torchvision's
`roi_heads.paste_masks_in_image` arithmetic exactly:

  1. pad the mask by 1 on each side (M + 2, zeros);
  2. scale the box about its centre by (M + 2) / M (float32, as torch computes it);
  3. truncate the box to integers (towards zero, torch's `.to(int64)`);
  4. resize the padded mask to (h, w) = (y2 - y1 + 1, x2 - x1 + 1) (at least 1) by
     bilinear interpolation with align_corners=False (torch's `F.interpolate`
     arithmetic, in float32, implemented here separably);
  5. copy it into the image at (x1, y1), clipped at the image border.

Unlike torchvision, every mask touches only its box's region: `paste_mask` computes only
the part of the resized mask that lands inside the image (never the full-size resize of
a box far larger than the image, never a full-size float image per mask), and
`iter_mask_rles` encodes one detection at a time, so nothing [K, H, W] is ever held.

A box that lies entirely outside the image pastes nothing (empty crop); torchvision's
slicing there raises or mis-pastes (negative slice ends), so such boxes are not part of
the parity contract. Model detections are clipped to the image, so they never are.

Thresholding is `prob > threshold` (torchvision's reference evaluation uses `> 0.5`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def expand_boxes_int(boxes, mask_size: int, padding: int = 1) -> np.ndarray:
    """Boxes scaled about their centres by (M + 2 * padding) / M, truncated to integers.

    torchvision's `expand_boxes(boxes, scale).to(torch.int64)` with `scale` from
    `expand_masks`: half widths / heights and centres in float32, the scale applied as a
    float32 number, truncation towards zero.

    Args:
      boxes: [K, 4] float (x1, y1, x2, y2) in original image pixels (cast to float32).
      mask_size: M, the side of the predicted masks.
      padding: pixels of zero padding added around each mask (torchvision: 1).
    Returns:
      [K, 4] int64 (x1, y1, x2, y2).
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    scale = np.float32((mask_size + 2 * padding) / mask_size)
    half = np.float32(0.5)
    w_half = (b[:, 2] - b[:, 0]) * half * scale
    h_half = (b[:, 3] - b[:, 1]) * half * scale
    x_c = (b[:, 2] + b[:, 0]) * half
    y_c = (b[:, 3] + b[:, 1]) * half
    out = np.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)
    return out.astype(np.int64)  # truncation towards zero, as torch's .to(int64)


def _linear_indices(in_size: int, out_size: int, start: int, stop: int):
    """torch's upsample_linear source indices and weights (align_corners=False, float32) for
    output positions [start, stop) of a resize from `in_size` to `out_size`.

    Returns (i0 [n] int64, i1 [n] int64, w0 [n] float32, w1 [n] float32).
    """
    dst = np.arange(start, stop, dtype=np.int64)
    if in_size == out_size:  # torch copies: lambda0 = 1, lambda1 = 0
        return dst, dst, np.ones(len(dst), np.float32), np.zeros(len(dst), np.float32)
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (dst.astype(np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0)).astype(np.float32)
    i1 = i0 + (i0 < in_size - 1)
    w0 = np.float32(1.0) - w1
    return i0, i1, w0, w1


def paste_mask(mask, box, image_hw, padding: int = 1, box_is_expanded: bool = False):
    """The pasted region of one mask: torchvision's `paste_mask_in_image`, cropped to the image.

    Args:
      mask: [M, M] float (probabilities; cast to float32).
      box: [4] float (x1, y1, x2, y2) of the detection in original image pixels; or, with
        `box_is_expanded`, the already expanded integer box of `expand_boxes_int`.
      image_hw: (H, W) of the original image.
      padding: zero padding around the mask (torchvision: 1).
    Returns:
      (crop, y0, x0): crop [h, w] float32, the pasted values of image rows y0:y0+h and
      columns x0:x0+w (everything else of the pasted image is 0). h or w is 0 when the
      box misses the image. Work and memory are O(M^2 + M * w + h * w).
    """
    mask = np.asarray(mask, np.float32)
    if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        raise ValueError(f"paste_mask: mask must be [M, M], got shape {mask.shape}")
    m = mask.shape[0]
    im_h, im_w = (int(v) for v in image_hw)
    if box_is_expanded:
        bx0, by0, bx1, by1 = (int(v) for v in np.asarray(box).reshape(4))
    else:
        bx0, by0, bx1, by1 = (int(v) for v in expand_boxes_int(np.asarray(box).reshape(1, 4), m, padding)[0])
    w = max(bx1 - bx0 + 1, 1)
    h = max(by1 - by0 + 1, 1)
    # the image region the (h, w) resized mask covers, clipped
    x0, x1 = max(bx0, 0), min(bx1 + 1, im_w, bx0 + w)
    y0, y1 = max(by0, 0), min(by1 + 1, im_h, by0 + h)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((max(y1 - y0, 0), max(x1 - x0, 0)), np.float32), y0, x0
    padded = np.pad(mask, padding) if padding else mask
    n = padded.shape[0]
    # rows / columns of the resized mask that land in the image
    xi0, xi1, xw0, xw1 = _linear_indices(n, w, x0 - bx0, x1 - bx0)
    yi0, yi1, yw0, yw1 = _linear_indices(n, h, y0 - by0, y1 - by0)
    # torch's bilinear: the inner (width) interpolation first, then the outer (height) one
    cols = padded[:, xi0] * xw0 + padded[:, xi1] * xw1  # [n, w_crop]
    crop = cols[yi0] * yw0[:, None]
    crop += cols[yi1] * yw1[:, None]
    return crop, y0, x0


def _check(masks, boxes):
    masks = np.asarray(masks)
    boxes = np.asarray(boxes, np.float32)
    if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
        raise ValueError(f"masks must be [K, M, M], got shape {masks.shape}")
    boxes = boxes.reshape(-1, 4)
    if len(boxes) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(boxes)} boxes")
    return masks, boxes


def iter_pasted_masks(masks, boxes, image_hw, threshold: float | None = 0.5, padding: int = 1):
    """Yields (crop, y0, x0) per detection, one at a time (see `paste_mask`).

    Args:
      masks: [K, M, M] float probabilities.
      boxes: [K, 4] float (x1, y1, x2, y2) in original image pixels.
      image_hw: (H, W).
      threshold: crops are bool `prob > threshold`; None yields float32 probabilities.
    Yields:
      K tuples (crop [h, w] bool or float32, y0 int, x0 int), in detection order.
    """
    masks, boxes = _check(masks, boxes)
    expanded = expand_boxes_int(boxes, masks.shape[-1], padding) if len(boxes) else np.zeros((0, 4), np.int64)
    for mask, box in zip(masks, expanded):
        crop, y0, x0 = paste_mask(mask, box, image_hw, padding, box_is_expanded=True)
        yield (crop if threshold is None else crop > threshold), y0, x0


def paste_masks(masks, boxes, image_hw, threshold: float | None = 0.5, padding: int = 1) -> np.ndarray:
    """All masks pasted into full-size images: torchvision's `paste_masks_in_image` (+ threshold).

    Args:
      masks: [K, M, M] float probabilities (M = 28 FPN, 14 C4).
      boxes: [K, 4] float (x1, y1, x2, y2) in original image pixels.
      image_hw: (H, W) of the original image.
      threshold: the result is `prob > threshold` as bool; None returns the float32
        probabilities.
    Returns:
      [K, H, W] bool (or float32 when threshold is None). Only the result is full size:
      each mask is resized within its box's clipped region and written in place.
    """
    masks, boxes = _check(masks, boxes)
    im_h, im_w = (int(v) for v in image_hw)
    out = np.zeros((len(masks), im_h, im_w), np.float32 if threshold is None else bool)
    for k, (crop, y0, x0) in enumerate(iter_pasted_masks(masks, boxes, image_hw, threshold, padding)):
        out[k, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


def iter_mask_rles(masks, boxes, image_hw, threshold: float = 0.5, padding: int = 1) -> Iterator[dict]:
    """COCO compressed RLEs of the thresholded pasted masks, one detection at a time.

    One [H, W] uint8 (Fortran-ordered) buffer is reused: each crop is written into it,
    encoded with `pycocotools.mask.encode` and cleared again, so memory stays at one
    image's bytes (H * W) plus one crop, whatever K is.

    Args:
      masks: [K, M, M] float probabilities; boxes: [K, 4] float (x1, y1, x2, y2) in
        original image pixels; image_hw: (H, W); threshold: foreground is `prob > threshold`.
    Yields:
      K dicts {"size": [H, W], "counts": str} (COCO compressed RLE, counts decoded to
      str so they are JSON-ready), in detection order. `pycocotools.mask.decode` of one
      equals `paste_masks(...)[k]`.
    """
    from pycocotools import mask as mask_utils

    if threshold is None:
        raise ValueError(
            "iter_mask_rles: an RLE is binary, threshold must be a number (use iter_pasted_masks for floats)"
        )
    im_h, im_w = (int(v) for v in image_hw)
    buffer = np.zeros((im_h, im_w), np.uint8, order="F")
    for crop, y0, x0 in iter_pasted_masks(masks, boxes, image_hw, threshold, padding):
        h, w = crop.shape
        buffer[y0 : y0 + h, x0 : x0 + w] = crop
        rle = mask_utils.encode(buffer)
        buffer[y0 : y0 + h, x0 : x0 + w] = 0
        yield {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
