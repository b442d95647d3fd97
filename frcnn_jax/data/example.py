"""The record ("example") every data source returns, and helpers to build and check it.

`source[i]` (random access, `len(source)` records) returns a dict:

| key | value |
| --- | --- |
| "image" | uint8 [H, W, 3] RGB |
| "boxes" | float32 [N, 4] (x1, y1, x2, y2), original image pixels, width = x2 - x1 (no "+1") |
| "labels" | int32 [N] contiguous labels 1..num_object_classes (0 is background, never a label) |
| "is_crowd" | bool [N] (COCO crowd regions; False elsewhere) |
| "difficult" | bool [N] (VOC "difficult"; False elsewhere) |
| "image_id" | int, the dataset's own id (COCO image id; the index for shapes) |
| "masks" | only from a source built with `masks=True`: uint8 [N, H, W] binary instance masks (original pixels) |

Every source also has `num_object_classes` (the object classes, WITHOUT background; the
model's `num_classes` counts background too: num_object_classes + 1), `category_names` (the name of
label i at index i - 1; no background entry, unlike a checkpoint's `class_names`, whose
index is the label and entry 0 the background), `label_to_category_id` (label -> the
dataset's category id) and `coco_gt()` (COCO-format ground truth for evaluation, see `coco_gt.py`).
Sources that can give instance masks have `has_masks = True` (shapes, COCO JSON) and take
`masks=True`; tfds `coco/2017` has `has_masks = False`.
"""

from __future__ import annotations

import numpy as np

EXAMPLE_KEYS = ("image", "boxes", "labels", "is_crowd", "difficult", "image_id")


def make_example(image, boxes, labels, image_id, is_crowd=None, difficult=None, masks=None) -> dict:
    """Builds a record with the canonical dtypes.

    Args:
      image: [H, W, 3] uint8 RGB.
      boxes: [N, 4] (x1, y1, x2, y2) pixels (any float/int dtype; [0] or [0, 4] when empty).
      labels: [N] labels 1..K.
      image_id: int.
      is_crowd, difficult: optional [N] bools (default all False).
      masks: optional [N, H, W] binary instance masks (stored as uint8 under "masks").
    Returns:
      dict with the keys of EXAMPLE_KEYS (see the module docstring), and "masks" when given.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = boxes.shape[0]
    example = {
        "image": np.asarray(image, np.uint8),
        "boxes": boxes,
        "labels": np.asarray(labels, np.int32).reshape(n),
        "is_crowd": np.zeros(n, bool) if is_crowd is None else np.asarray(is_crowd, bool).reshape(n),
        "difficult": np.zeros(n, bool) if difficult is None else np.asarray(difficult, bool).reshape(n),
        "image_id": int(image_id),
    }
    if masks is not None:
        example["masks"] = np.asarray(masks, np.uint8).reshape((n,) + example["image"].shape[:2])
    return example


def validate_example(example: dict, num_object_classes: int | None = None) -> None:
    """Checks a record's keys, shapes, dtypes and values.

    Raises:
      ValueError naming the image id and the offending field: missing keys, an image that
      is not uint8 [H, W, 3], boxes not float32 [N, 4], per-box arrays of another length
      or dtype, non-finite or inverted boxes, labels outside 1..num_object_classes.
    """
    missing = [k for k in EXAMPLE_KEYS if k not in example]
    if missing:
        raise ValueError(f"example is missing keys {missing}")
    where = f"example image_id={example['image_id']}"
    image = example["image"]
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{getattr(image, 'dtype', type(image))} {np.shape(image)}"
        raise ValueError(f"{where}: 'image' must be uint8 [H, W, 3], got {got}")
    boxes = example["boxes"]
    if boxes.dtype != np.float32 or boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: 'boxes' must be float32 [N, 4], got {boxes.dtype} {boxes.shape}")
    n = boxes.shape[0]
    for key, dtype in (("labels", np.int32), ("is_crowd", np.bool_), ("difficult", np.bool_)):
        value = example[key]
        if value.dtype != dtype or value.shape != (n,):
            raise ValueError(f"{where}: '{key}' must be {np.dtype(dtype).name} [{n}], got {value.dtype} {value.shape}")
    if not np.all(np.isfinite(boxes)):
        raise ValueError(f"{where}: 'boxes' has non-finite values")
    if np.any(boxes[:, 2:] < boxes[:, :2]):
        raise ValueError(f"{where}: 'boxes' has inverted boxes (x2 < x1 or y2 < y1)")
    labels = example["labels"]
    if n and (labels.min() < 1 or (num_object_classes is not None and labels.max() > num_object_classes)):
        raise ValueError(f"{where}: 'labels' must lie in 1..{num_object_classes}, got {labels.min()}..{labels.max()}")
    if "masks" in example:
        masks = example["masks"]
        if masks.dtype != np.uint8 or masks.shape != (n,) + image.shape[:2]:
            raise ValueError(
                f"{where}: 'masks' must be uint8 [{n}, {image.shape[0]}, {image.shape[1]}], got {masks.dtype} {masks.shape}"
            )
    if not isinstance(example["image_id"], (int, np.integer)):
        raise ValueError(f"{where}: 'image_id' must be an int, got {type(example['image_id'])}")
