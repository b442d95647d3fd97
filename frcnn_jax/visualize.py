"""Drawing detections on images (PIL), like the slides' "person: 0.99" picture, and instance masks.

Masks are drawn as torchvision's `utils.draw_segmentation_masks` (0.29) draws them: each
mask's pixels are painted in its colour (pixels of two or more masks in black), then
blended with the image, `image * (1 - alpha) + colour * alpha` (float32, truncated to
uint8), alpha 0.5 by default here. Pixels outside every mask stay as they are.
Memory is bounded: masks may come as pasted crops or RLEs, one at a time, never as a
[K, H, W] array (see `blend_masks`).
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def class_color(label: int) -> tuple[int, int, int]:
    """A stable, well-separated colour per class label (golden-ratio hue steps)."""
    h = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def label_name(label: int, class_names: Sequence[str] | None) -> str:
    """The name of a model label: `class_names[label]` (index = label, entry 0 = background), else str(label)."""
    return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def label_text(label: int, score: float, class_names: Sequence[str] | None) -> str:
    """The caption "name: score" (2 decimals)."""
    return f"{label_name(label, class_names)}: {score:.2f}"


def _mask_crops(masks, image_hw) -> Iterable[tuple[np.ndarray, int, int]]:
    """(crop [h, w] bool, y0, x0) per mask, one at a time, from any of `blend_masks`' mask forms."""
    from pycocotools import mask as mask_utils

    if isinstance(masks, np.ndarray):
        if masks.ndim != 3 or tuple(masks.shape[1:]) != tuple(image_hw):
            raise ValueError(f"masks must be [K, H, W] with (H, W) = {tuple(image_hw)}, got shape {masks.shape}")
        for m in masks:
            yield m.astype(bool, copy=False), 0, 0
        return
    for item in masks:
        if isinstance(item, dict):  # COCO RLE ({"size", "counts"}), e.g. from host_masks.iter_mask_rles
            if list(item["size"]) != list(image_hw):
                raise ValueError(f"RLE size {list(item['size'])} is not the image's {list(image_hw)}")
            yield mask_utils.decode(item).astype(bool), 0, 0
        else:  # (crop, y0, x0), e.g. from host_masks.iter_pasted_masks
            crop, y0, x0 = item
            yield np.asarray(crop, bool), int(y0), int(x0)


def blend_masks(image: np.ndarray, masks, colors: Sequence[tuple[int, int, int]], alpha: float = 0.5) -> np.ndarray:
    """Instance masks drawn as translucent fills: torchvision's `draw_segmentation_masks`.

    Args:
      image: uint8 [H, W, 3].
      masks: K masks, either a [K, H, W] bool array, or an iterable of K items, each a
        (crop [h, w] bool, y0, x0) tuple (the mask is `crop` at rows y0:y0+h, columns
        x0:x0+w, False elsewhere: `host_masks.iter_pasted_masks(..., threshold=0.5)`)
        or a COCO RLE dict at the image's size (`host_masks.iter_mask_rles`). Iterables
        are consumed one mask at a time.
      colors: K (r, g, b) colours, 0-255, one per mask.
      alpha: the fill's opacity.
    Returns:
      uint8 [H, W, 3], as torchvision 0.29 computes it: a pixel in exactly one mask is
      `image * (1 - alpha) + colour * alpha` (float32, truncated to uint8); a pixel in
      two or more masks is blended with black (`image * (1 - alpha)`: overlaps show
      dark); every other pixel is `image`'s. Equal to
      `draw_segmentation_masks(image, masks, alpha, colors)` (everywhere for alpha 0.5;
      for other alphas torchvision's float round trip may change uncovered pixels by
      one, ours leaves them as they are).
    Memory: the image, one painted copy and an [H, W] uint8 coverage count, plus one
    mask at a time.
    """
    image = np.asarray(image, np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got shape {image.shape}")
    painted = image.copy()
    count = np.zeros(image.shape[:2], np.uint8)  # masks covering each pixel, saturated at 2
    n = 0
    for k, (crop, y0, x0) in enumerate(_mask_crops(masks, image.shape[:2])):
        n = k + 1
        if k >= len(colors):
            raise ValueError(f"more masks than colours ({len(colors)})")
        h, w = crop.shape
        painted[y0 : y0 + h, x0 : x0 + w][crop] = colors[k]
        region = count[y0 : y0 + h, x0 : x0 + w]
        np.minimum(region + crop, 2, out=region, casting="unsafe")
    if n != len(colors):
        raise ValueError(f"{n} masks but {len(colors)} colours")
    painted[count > 1] = 0
    covered = count > 0
    out = image.copy()
    keep, fill = np.float32(1.0 - alpha), np.float32(alpha)  # as torch: the scalars rounded to float32
    blended = image[covered].astype(np.float32) * keep + painted[covered].astype(np.float32) * fill
    out[covered] = blended.astype(np.uint8)
    return out


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    line_width: int | None = None,
    masks=None,
    mask_alpha: float = 0.5,
) -> Image.Image:
    """Returns a PIL image with each box outlined and captioned "name: score", and each mask filled.

    image: uint8 [H, W, 3]; boxes: [K, 4] (x1, y1, x2, y2) in the image's pixels;
    scores: [K]; labels: [K] class indices into `class_names`.
    masks: optional, the K detections' masks at the image's size, in detection order:
      a [K, H, W] bool array, or an iterable of (crop, y0, x0) tuples or COCO RLE dicts
      (see `blend_masks`; read one at a time). Each is filled in its box's colour with
      opacity `mask_alpha`, under the boxes, as torchvision's `draw_segmentation_masks`
      does (where masks overlap, the fill is black).
    """
    image = np.asarray(image, np.uint8)
    if masks is not None:
        colors = [class_color(int(label)) for label in np.asarray(labels).reshape(-1)]
        image = blend_masks(image, masks, colors, mask_alpha)
    img = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(img)
    width = line_width or max(2, round(max(img.size) / 300))
    try:
        font = ImageFont.load_default(size=max(12, round(max(img.size) / 45)))
    except TypeError:  # older Pillow without sized default font
        font = ImageFont.load_default()
    # lowest score first, so the best detections are drawn on top
    for k in np.argsort(scores, kind="stable"):
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        color = class_color(int(labels[k]))
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        text = label_text(int(labels[k]), float(scores[k]), class_names)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0, ty1 - ty0
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=color)
        draw.text((x1 + 2 - tx0, ty + 2 - ty0), text, fill=(0, 0, 0), font=font)
    return img
