"""Shapes: the built-in synthetic detection dataset (no download, generated on the fly).

Each image is a textured background (smooth noise, a gradient or stripes, in muted colours,
plus mild pixel noise) with 1..max_objects shapes of 5 classes (circle, square, triangle,
diamond, cross), each in a random saturated colour from an 8-colour palette. Sizes are
log-uniform in [min_size, max_size] with a mild random aspect ratio (so "square" and
"circle" are axis-aligned rectangles and ellipses at aspect 1/max_aspect..max_aspect).

Placement keeps the task clean: a new shape is rejected when its box overlaps an existing
one with IoU > max_iou, or when it would leave an earlier shape with less than half of its
pixels visible; so later shapes may partly occlude earlier ones but never hide them.
Shapes are drawn without anti-aliasing; the ground-truth box is the tight box of the
shape's *visible* pixels in pixel-edge coordinates (a shape covering columns 10..29 has
x1 = 10, x2 = 30), so boxes are exact.

Deterministic: image `index` of `split` is generated from
`np.random.default_rng([seed, split_id, index])` (train 0, val 1, test 2), so splits never
share images and any record can be regenerated anywhere (worker processes, other hosts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from frcnn_jax.data.coco_gt import coco_gt_from_targets
from frcnn_jax.data.example import make_example
from frcnn_jax.data.transforms import resize_bilinear
from frcnn_jax.host_boxes import iou_one_to_many

SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "cross")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_IMAGES = {"train": 4096, "val": 256, "test": 256}

# Saturated object colours (RGB); each object jitters its colour by up to +-20 per channel.
PALETTE = np.array(
    [
        (230, 25, 75),  # red
        (60, 180, 75),  # green
        (255, 225, 25),  # yellow
        (0, 130, 200),  # blue
        (245, 130, 48),  # orange
        (145, 30, 180),  # purple
        (70, 240, 240),  # cyan
        (240, 50, 230),  # magenta
    ],
    np.float32,
)
_CROSS_BAR = 1.0 / 3.0  # half-thickness of the cross's bars relative to its half-size
_MIN_VISIBLE = 0.5  # an earlier shape keeps at least this fraction of its pixels
_MIN_PIXELS = 16  # a shape must cover at least this many pixels


def _shape_mask(kind: str, u, v, flip: bool):
    """Inside test on normalised pixel-centre offsets u, v in [-1, 1] (box half-sizes = 1)."""
    if kind == "circle":
        return u * u + v * v <= 1.0
    if kind == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if kind == "triangle":  # apex up (or down when flipped), base on the opposite side
        v = -v if flip else v
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 1.0) & (av <= _CROSS_BAR)) | ((au <= _CROSS_BAR) & (av <= 1.0))
    raise ValueError(f"unknown shape {kind!r}")


def _background(rng: np.random.Generator, height: int, width: int):
    """float32 [H, W, 3] textured background in muted colours (0..255)."""

    def muted():
        return rng.uniform(60, 200) + rng.uniform(-25, 25, size=3)

    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse random grid upsampled bilinearly
        gh, gw = rng.integers(2, 7, size=2)
        grid = muted()[None, None] + rng.uniform(-45, 45, size=(gh, gw, 3))
        bg = resize_bilinear(grid.astype(np.float32), (height, width))
    else:
        ys, xs = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
        angle = rng.uniform(0, np.pi)
        t = np.cos(angle) * xs + np.sin(angle) * ys
        if kind == 1:  # linear gradient between two muted colours
            t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
            c0, c1 = muted(), muted()
            bg = c0 + t[..., None] * (c1 - c0)
        else:  # soft stripes
            period = rng.uniform(6, 24)
            amp = rng.uniform(10, 35)
            bg = muted() + (amp * np.sin(2 * np.pi * t / period))[..., None] * rng.uniform(0.5, 1.0, size=3)
    return bg.astype(np.float32)


def _tight_box(mask, x0: int, y0: int):
    """Tight (x1, y1, x2, y2) pixel-edge box of a boolean mask whose origin is (x0, y0)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1], np.float64)


def visible_masks(owner, count: int):
    """int32 [H, W] instance map (-1 background) -> uint8 [count, H, W] one binary mask per shape."""
    return (np.asarray(owner)[None] == np.arange(count, dtype=np.int32)[:, None, None]).astype(np.uint8)


class ShapesDataset:
    """Random-access synthetic detection dataset; `ds[i]` returns the record of `example.py`.

    Args:
      split: "train", "val" or "test" (disjoint images).
      seed: dataset seed (with split and index it determines every image).
      num_images: number of images (default 4096 for train, 256 otherwise).
      image_size: (H, W) of every image.
      min_objects, max_objects: number of shapes per image (uniform; a shape that cannot be
        placed under the overlap rules after many tries is skipped, which is rare).
      min_size, max_size: range of the shapes' nominal size in pixels (log-uniform).
      max_iou: largest IoU allowed between a new shape's box and an existing one.
      max_aspect: nominal aspect ratios are log-uniform in [1 / max_aspect, max_aspect].
      classes: the shape classes to use, a subset of SHAPE_NAMES in any order
        (label i + 1 = classes[i]).
      masks: records carry "masks" uint8 [N, H, W]: each shape's exact visible pixels
        (those no later shape painted over), whose tight box is its ground-truth box.
    """

    has_masks = True

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        num_images: int | None = None,
        image_size: tuple[int, int] = (128, 128),
        min_objects: int = 1,
        max_objects: int = 5,
        min_size: int = 12,
        max_size: int = 64,
        max_iou: float = 0.3,
        max_aspect: float = 1.5,
        classes: Sequence[str] = SHAPE_NAMES,
        masks: bool = False,
    ):
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        height, width = int(image_size[0]), int(image_size[1])
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        if not 4 <= min_size <= max_size <= min(height, width):
            raise ValueError(
                f"need 4 <= min_size <= max_size <= min(image_size), got min_size={min_size}, "
                f"max_size={max_size}, image_size={image_size}"
            )
        unknown = [c for c in classes if c not in SHAPE_NAMES]
        if unknown or not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names from {SHAPE_NAMES}, got {list(classes)}")
        self.split = split
        self.seed = int(seed)
        self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
        self.image_size = (height, width)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.min_size, self.max_size = float(min_size), float(max_size)
        self.max_iou = float(max_iou)
        self.max_aspect = float(max_aspect)
        self.category_names = list(classes)
        self.num_object_classes = len(self.category_names)
        self.label_to_category_id = {i + 1: i + 1 for i in range(self.num_object_classes)}
        self.masks = bool(masks)

    def __len__(self) -> int:
        return self.num_images

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, seed={self.seed}, num_images={self.num_images}, "
            f"image_size={self.image_size})"
        )

    def __getitem__(self, index) -> dict:
        example, owner = self.render_with_masks(index)
        if self.masks:
            example["masks"] = visible_masks(owner, len(example["labels"]))
        return example

    def render_with_masks(self, index: int):
        """The record of image `index` and its instance map.

        Returns:
          (example, instances): the record of `ds[index]` and int32 [H, W] giving, per
          pixel, the row in example["boxes"] of the shape visible there (-1: background).
        """
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        height, width = self.image_size
        image = _background(rng, height, width)
        owner = np.full((height, width), -1, np.int32)  # which shape each pixel shows
        full_area: list[int] = []
        visible: list[int] = []
        boxes: list[np.ndarray] = []
        labels: list[int] = []
        colors: list[int] = []
        target = int(rng.integers(self.min_objects, self.max_objects + 1))
        log_aspect = math.log(self.max_aspect)
        for k in range(target):
            tries = 100 if k < self.min_objects else 25
            for _ in range(tries):
                cls = int(rng.integers(self.num_object_classes))
                size = math.exp(rng.uniform(math.log(self.min_size), math.log(self.max_size)))
                aspect = math.exp(rng.uniform(-log_aspect, log_aspect))
                w = min(max(size * math.sqrt(aspect), self.min_size), self.max_size)
                h = min(max(size / math.sqrt(aspect), self.min_size), self.max_size)
                fx0, fy0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
                x0, y0 = int(math.floor(fx0)), int(math.floor(fy0))
                x1, y1 = min(int(math.ceil(fx0 + w)), width), min(int(math.ceil(fy0 + h)), height)
                u = (np.arange(x0, x1) + 0.5 - (fx0 + w / 2)) / (w / 2)
                v = (np.arange(y0, y1) + 0.5 - (fy0 + h / 2)) / (h / 2)
                mask = _shape_mask(self.category_names[cls], u[None, :], v[:, None], flip=bool(rng.integers(2)))
                if mask.sum() < _MIN_PIXELS:
                    continue
                box = _tight_box(mask, x0, y0)
                placed = np.asarray(boxes, np.float64).reshape(-1, 4)
                if np.any(iou_one_to_many(box, placed) > self.max_iou):
                    continue
                covered = owner[y0:y1, x0:x1][mask]
                lost = np.bincount(covered[covered >= 0], minlength=len(boxes))
                if any(visible[j] - lost[j] < _MIN_VISIBLE * full_area[j] for j in range(len(boxes))):
                    continue
                for j in range(len(boxes)):
                    visible[j] -= int(lost[j])
                # A colour unlike those of the shapes it touches, so touching shapes never merge.
                near = iou_one_to_many(box + np.array([-2, -2, 2, 2]), placed) > 0
                allowed = np.setdiff1d(np.arange(len(PALETTE)), np.asarray(colors)[near] if near.any() else [])
                color_index = int(allowed[rng.integers(len(allowed))])
                color = PALETTE[color_index] + rng.uniform(-20, 20, size=3)
                image[y0:y1, x0:x1][mask] = color
                owner[y0:y1, x0:x1][mask] = len(boxes)
                area = int(mask.sum())
                full_area.append(area)
                visible.append(area)
                boxes.append(box)
                labels.append(cls + 1)
                colors.append(color_index)
                break
        # Exact boxes: the tight box of each shape's visible pixels.
        final = [_tight_box(owner == j, 0, 0) for j in range(len(boxes))]
        image += rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
        example = make_example(image, np.asarray(final, np.float32).reshape(-1, 4), labels, index)
        return example, owner

    def coco_gt(self) -> dict:
        """COCO-format ground truth of the whole split (renders every image once).

        With masks=True the annotations also hold each shape's visible pixels as
        `segmentation` (compressed RLE) and their count as `area` (box area otherwise).
        """
        height, width = self.image_size

        def entries():
            for i in range(self.num_images):
                ex = self[i]
                yield {
                    "image_id": i,
                    "height": height,
                    "width": width,
                    "file_name": f"shapes_{self.split}_{i:06d}.png",
                    "boxes": ex["boxes"],
                    "labels": ex["labels"],
                    "is_crowd": ex["is_crowd"],
                    "masks": ex.get("masks"),  # with masks=True: segmentations, mask areas
                }

        return coco_gt_from_targets(entries(), self.category_names, self.label_to_category_id)
