"""The COCO ground-truth format: the one structural check, shared by the data source and the evaluation.

    problem = coco_gt_problem(dataset, training=True)   # None, or what is wrong (one line)

Pure Python (no numpy, no pycocotools), so both `frcnn_jax.data.coco_json` (training
records) and `frcnn_jax.evaluation.coco` (COCOeval) use it without importing each
other; each raises its own error type with the file's name in front of the problem.

A COCO ground-truth dict has "images", "annotations" and "categories" lists of objects,
each with a unique integer "id"; every annotation's "image_id" / "category_id" is an
id of those lists and its "bbox" is 4 finite numbers [x, y, width, height]. Training
also needs each image's "file_name", "width", "height" and each category's "name";
COCOeval needs each annotation's numeric "area" and "iscrowd" 0 or 1.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

SECTIONS = ("images", "annotations", "categories")
_SINGULAR = {"images": "image", "annotations": "annotation", "categories": "category"}
_TRAINING_KEYS = {"images": ("file_name", "width", "height"), "categories": ("name",), "annotations": ()}


def is_int(v: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_box(v: Any) -> bool:
    """A list/tuple of 4 finite numbers (a COCO [x, y, width, height])."""
    return isinstance(v, (list, tuple)) and len(v) == 4 and all(is_real(x) for x in v)


def json_kind(v: Any) -> str:
    """How a JSON value reads in a message: "an object", "a list", "a string", or its type name."""
    return {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def coco_gt_problem(dataset: Any, *, training: bool = False) -> str | None:
    """The first structural problem of a COCO ground-truth dict, or None (checks in the module doc).

    Args:
      dataset: the parsed JSON.
      training: also require what the training records need (image file_name / width /
        height, category name); otherwise require what COCOeval("bbox") needs
        (annotation area, iscrowd 0 or 1).
    Returns:
      None, or one line naming the entry (e.g. "annotation id 77 (annotations[0]) has
      unknown category_id 12 (not an id in 'categories')").
    """
    if not isinstance(dataset, dict):
        hint = " (a COCO results file?)" if isinstance(dataset, list) else ""
        return f"top level is {json_kind(dataset)}{hint}, expected an object with images, annotations, categories"
    for key in SECTIONS:
        if key not in dataset:
            return f"missing required key '{key}'"
        if not isinstance(dataset[key], list):
            return f"'{key}' is {json_kind(dataset[key])}, expected a list"
    ids: dict[str, set] = {}
    for key in ("images", "categories", "annotations"):
        seen, kind = set(), _SINGULAR[key]
        for n, item in enumerate(dataset[key]):
            if not isinstance(item, dict):
                return f"{key}[{n}] is {json_kind(item)}, expected an object"
            if not is_int(item.get("id")):
                return f"{key}[{n}] has no integer 'id'"
            if item["id"] in seen:
                return f"duplicate {kind} id {item['id']} ({key}[{n}])"
            seen.add(item["id"])
            for required in _TRAINING_KEYS[key] if training else ():
                if required not in item:
                    return f"{kind} id {item['id']} ({key}[{n}]) is missing required key '{required}'"
        ids[key] = seen
    for n, cat in enumerate(dataset["categories"]):
        if "name" in cat and not isinstance(cat["name"], str):
            return f"category id {cat['id']} (categories[{n}]) 'name' is not a string"
    for n, ann in enumerate(dataset["annotations"]):
        where = f"annotation id {ann['id']} (annotations[{n}])"
        for key, section in (("image_id", "images"), ("category_id", "categories")):
            if key not in ann:
                return f"{where} is missing required key '{key}'"
            if not is_int(ann[key]) or ann[key] not in ids[section]:
                return f"{where} has unknown {key} {ann[key]!r} (not an id in '{section}')"
        if "bbox" not in ann:
            return f"{where} is missing required key 'bbox'"
        if not is_box(ann["bbox"]):
            return f"{where} has an invalid bbox {ann['bbox']!r} (need 4 finite numbers [x, y, width, height])"
        if training:
            continue
        if not is_real(ann.get("area")):
            return f"{where} has no numeric 'area' (COCOeval needs it for the small/medium/large ranges)"
        if ann.get("iscrowd") not in (0, 1):
            return f"{where} 'iscrowd' must be 0 or 1, got {ann.get('iscrowd')!r}"
    return None
