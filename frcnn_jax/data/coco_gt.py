"""COCO-format ground truth (the dict pycocotools' `COCO` takes) built from boxes in pixels.

Used by sources whose ground truth is not a COCO JSON file already (shapes, tfds). The
result has `images` (id, width, height, file_name), `annotations` (id from 1, image_id,
category_id, bbox [x, y, w, h], area, iscrowd, and `segmentation` (compressed RLE, counts
as str) when the entries give masks) and `categories` (id, name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_utils


def coco_gt_from_targets(
    entries: Iterable[Mapping],
    category_names: Sequence[str],
    label_to_category_id: Mapping[int, int],
) -> dict:
    """COCO ground truth from per-image targets.

    Args:
      entries: one mapping per image with "image_id" (int), "height", "width" (ints),
        "file_name" (str), "boxes" [N, 4] (x1, y1, x2, y2) pixels, "labels" [N] (1..K),
        "is_crowd" [N] bool, and optionally "area" [N] (default: box width * height, or
        the mask's pixel count with masks) and "masks" uint8 [N, height, width] (adds each
        annotation's "segmentation", for pycocotools' segm evaluation).
      category_names: name of label i at index i - 1.
      label_to_category_id: contiguous label -> category id written to the annotations.
    Returns:
      dict with "images", "annotations", "categories" (plain Python numbers, JSON-serialisable).
    """
    images, annotations = [], []
    for entry in entries:
        image_id = int(entry["image_id"])
        images.append(
            {
                "id": image_id,
                "width": int(entry["width"]),
                "height": int(entry["height"]),
                "file_name": str(entry["file_name"]),
            }
        )
        boxes = np.asarray(entry["boxes"], np.float64).reshape(-1, 4)
        labels = np.asarray(entry["labels"]).reshape(-1)
        crowd = np.asarray(entry["is_crowd"], bool).reshape(-1)
        wh = boxes[:, 2:] - boxes[:, :2]
        area = (
            np.asarray(entry["area"], np.float64).reshape(-1) if entry.get("area") is not None else wh[:, 0] * wh[:, 1]
        )
        masks = entry.get("masks")
        rles = []
        if masks is not None:
            rles = mask_utils.encode(np.asfortranarray(np.asarray(masks, np.uint8).transpose(1, 2, 0)))
            if entry.get("area") is None:
                area = mask_utils.area(rles).astype(np.float64)
        for k in range(boxes.shape[0]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label_to_category_id[int(labels[k])]),
                    "bbox": [float(boxes[k, 0]), float(boxes[k, 1]), float(wh[k, 0]), float(wh[k, 1])],
                    "area": float(area[k]),
                    "iscrowd": int(crowd[k]),
                }
            )
            if masks is not None:
                annotations[-1]["segmentation"] = {
                    "size": [int(v) for v in rles[k]["size"]],
                    "counts": rles[k]["counts"].decode(),
                }
    categories = [{"id": int(label_to_category_id[i + 1]), "name": str(name)} for i, name in enumerate(category_names)]
    return {"images": images, "annotations": annotations, "categories": categories}
