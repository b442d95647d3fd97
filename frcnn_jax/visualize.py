"""Drawing detections on images (PIL), like the slides' "person: 0.99" picture."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

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


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """Returns a PIL image with each box outlined and captioned "name: score".

    image: uint8 [H, W, 3]; boxes: [K, 4] (x1, y1, x2, y2) in the image's pixels;
    scores: [K]; labels: [K] class indices into `class_names`.
    """
    img = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
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
