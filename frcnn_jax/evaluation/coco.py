"""COCO box and mask evaluation: model outputs -> COCO results, and pycocotools' COCOeval.

`evaluate_coco` runs `pycocotools.cocoeval.COCOeval(gt, dt, "bbox")` with its default
parameters, exactly as the official API (every GT image is evaluated), and returns the
12 summary numbers at full precision, Detectron2-style per-class AP and the arrays a
precision-recall plot needs. When the results carry "segmentation" (COCO compressed
RLE, as `pycocotools.mask.encode` writes it), it also runs COCOeval(gt, dt, "segm") and
returns those numbers as `CocoEvalResult.segm`.

Instance masks (segm):
  - every result carries "segmentation", or none does; likewise "bbox" (a mix is an error
    naming the first result that lacks it);
  - the segm evaluation sees the results WITHOUT their "bbox" (as Detectron2 does), so
    pycocotools takes each result's area from its mask, not its box (with a "bbox",
    `COCO.loadRes` would use the box area for the small / medium / large ranges);
  - results with "segmentation" but no "bbox" (e.g. the official fake segm results)
    get the box of their mask's extent (`pycocotools.mask.toBbox`) for the bbox
    evaluation, so the top-level (bbox) numbers always exist;
  - ground truth may be polygons (one or several parts), uncompressed RLE (crowd
    regions) or compressed RLE: whatever `COCO.annToRLE` reads. Each annotation is
    converted once before evaluation; one that pycocotools cannot read, or whose RLE
    size is not its image's (height, width), is an `EvaluationInputError` naming the
    annotation id. pycocotools' progress messages are captured; the standard
12-line summary it prints is returned as `CocoEvalResult.summary` for the caller to
print.

Inputs are checked before pycocotools sees them, so a malformed file gives one clear
`EvaluationInputError` (a `ValueError`) naming the file and the problem instead of a
`KeyError` deep inside pycocotools.

Boxes: model outputs are (x1, y1, x2, y2) in original image pixels (torchvision's
convention, width = x2 - x1); COCO results are [x, y, width, height].
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from frcnn_jax.coco_format import coco_gt_problem, is_box, is_int, is_real, json_kind

# pycocotools' `COCOeval.stats` order (its summarize() lines, top to bottom).
STAT_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class EvaluationInputError(ValueError):
    """An evaluation input (file, dict or list) is missing or malformed; the message says which and why."""


# --------------------------------------------------------------------------------------
# Model outputs -> COCO results.
# --------------------------------------------------------------------------------------


def contiguous_label_map(category_ids: Sequence[int]) -> dict[int, int]:
    """{label: category_id} for contiguous labels: label i + 1 <-> category_ids[i] (0 = background).

    E.g. `contiguous_label_map(frcnn_jax.categories.COCO_CATEGORY_IDS)` for an 80-class
    COCO model, or the sorted category ids of a COCO GT file.
    """
    return {i + 1: int(c) for i, c in enumerate(category_ids)}


def _category_lookup(label_to_category_id):
    if label_to_category_id is None:
        return lambda label: label
    if isinstance(label_to_category_id, Mapping):
        table = {int(k): int(v) for k, v in label_to_category_id.items()}
        return table.get
    seq = [int(v) for v in label_to_category_id]
    return lambda label: seq[label] if 0 < label < len(seq) else None


def to_coco_results(image_ids, boxes, scores, labels, label_to_category_id=None, valid=None) -> list[dict]:
    """Detections of a batch of images as COCO results-format dicts.

    Each argument is indexed by image first; per image it may be a padded row of a
    batched array or a ragged per-image array (a list of arrays works):

    Args:
      image_ids: [B] int, the dataset's image id of each image.
      boxes: [B, K, 4] float (x1, y1, x2, y2) in ORIGINAL image pixels.
      scores: [B, K] float.
      labels: [B, K] int, contiguous model labels 1..C (0 = background / padding).
      label_to_category_id: how a label becomes the dataset's category id: a mapping
        {label: category_id} (see `contiguous_label_map`), a sequence indexed by label
        (entry 0, background, unused), or None when labels already are category ids
        (torchvision's 91-class COCO models).
      valid: optional [B, K] bool; False entries (padding) are dropped.
    Returns:
      list of {"image_id": int, "category_id": int, "bbox": [x, y, w, h] (4 floats),
      "score": float}, plain Python numbers (JSON serialisable), in input order.
      Entries that are not valid or have label <= 0 are dropped.
    Raises:
      ValueError: batch sizes disagree, a kept label has no category id, or a kept
        box or score is not finite.
    """
    lookup = _category_lookup(label_to_category_id)
    image_ids = np.asarray(image_ids).reshape(-1)
    sizes = [len(image_ids), len(boxes), len(scores), len(labels)] + ([] if valid is None else [len(valid)])
    if len(set(sizes)) != 1:
        raise ValueError(
            f"to_coco_results: image_ids, boxes, scores, labels (and valid) must have the same batch size, got {sizes}"
        )
    results = []
    for i, image_id in enumerate(image_ids.tolist()):
        b = np.asarray(boxes[i], np.float64).reshape(-1, 4)
        s = np.asarray(scores[i], np.float64).reshape(-1)
        lab = np.asarray(labels[i]).reshape(-1).astype(np.int64)
        if not (len(b) == len(s) == len(lab)):
            raise ValueError(f"to_coco_results: image {image_id}: {len(b)} boxes, {len(s)} scores, {len(lab)} labels")
        keep = lab > 0
        if valid is not None:
            v = np.asarray(valid[i], bool).reshape(-1)
            if len(v) != len(lab):
                raise ValueError(f"to_coco_results: image {image_id}: valid has {len(v)} entries for {len(lab)} boxes")
            keep &= v
        for k in np.flatnonzero(keep):
            label = int(lab[k])
            category_id = lookup(label)
            if category_id is None:
                raise ValueError(
                    f"to_coco_results: image {image_id}: label {label} has no category id in label_to_category_id"
                )
            x1, y1, x2, y2 = (float(v) for v in b[k])
            score = float(s[k])
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2, score)):
                raise ValueError(f"to_coco_results: image {image_id}: non-finite box {b[k].tolist()} or score {score}")
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(category_id),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return results


def to_coco_results_with_masks(
    image_id,
    boxes,
    scores,
    labels,
    masks,
    image_hw,
    label_to_category_id=None,
    valid=None,
    mask_threshold: float = 0.5,
) -> list[dict]:
    """One image's Mask R-CNN detections as COCO results with "bbox" and "segmentation".

    The masks are pasted one detection at a time (`host_masks.iter_mask_rles`:
    torchvision's paste arithmetic, each mask within its box's clipped region) and
    RLE-encoded; no [K, H, W] array is ever made.

    Args:
      image_id: int, the dataset's image id.
      boxes: [K, 4] float (x1, y1, x2, y2) in ORIGINAL image pixels.
      scores: [K] float; labels: [K] int, contiguous model labels (0 = background / padding).
      masks: [K, M, M] float probabilities in each box's frame (the model's `masks` row).
      image_hw: (height, width) of the original image.
      label_to_category_id, valid: as in `to_coco_results` (valid: [K] bool).
      mask_threshold: foreground is `probability > mask_threshold`.
    Returns:
      list of {"image_id", "category_id", "bbox": [x, y, w, h], "score",
      "segmentation": {"size": [H, W], "counts": str}}, the kept detections in input order
      (the same ones, in the same order, as `to_coco_results`).
    Raises:
      ValueError: as `to_coco_results`, or masks not [K, M, M] for the K boxes.
    """
    from frcnn_jax import host_masks

    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    lab = np.asarray(labels).reshape(-1).astype(np.int64)
    masks = np.asarray(masks)
    if masks.ndim != 3 or len(masks) != len(b):
        raise ValueError(f"to_coco_results_with_masks: image {image_id}: masks {masks.shape} for {len(b)} boxes")
    keep = lab > 0
    if valid is not None:
        v = np.asarray(valid, bool).reshape(-1)
        if len(v) != len(lab):
            raise ValueError(
                f"to_coco_results_with_masks: image {image_id}: valid has {len(v)} entries for {len(lab)} boxes"
            )
        keep &= v
    s = np.asarray(scores).reshape(-1)
    if not (len(b) == len(s) == len(lab)):
        raise ValueError(
            f"to_coco_results_with_masks: image {image_id}: {len(b)} boxes, {len(s)} scores, {len(lab)} labels"
        )
    boxes64 = np.asarray(boxes, np.float64).reshape(-1, 4)
    results = to_coco_results([image_id], [boxes64[keep]], [s[keep]], [lab[keep]], label_to_category_id)
    rles = host_masks.iter_mask_rles(masks[keep], b[keep], image_hw, mask_threshold)
    for result, rle in zip(results, rles, strict=True):
        result["segmentation"] = rle
    return results


# --------------------------------------------------------------------------------------
# Loading and checking inputs.
# --------------------------------------------------------------------------------------


def load_json(path, what: str) -> Any:
    """Parsed JSON of `path`; `what` names the file in errors ("annotations file").

    Raises:
      EvaluationInputError: "<what> '<path>' does not exist" / "is a directory" /
        "cannot be read: ..." / "is not valid JSON: ... (line L, column C)".
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise EvaluationInputError(f"{what} '{path}' does not exist") from None
    except IsADirectoryError:
        raise EvaluationInputError(f"{what} '{path}' is a directory, expected a JSON file") from None
    except UnicodeDecodeError:
        raise EvaluationInputError(f"{what} '{path}' is not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise EvaluationInputError(
            f"{what} '{path}' is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
        ) from None
    except OSError as e:
        raise EvaluationInputError(f"{what} '{path}' cannot be read: {e.strerror or e}") from None


def check_coco_gt(dataset, source: str = "ground truth") -> None:
    """Checks that `dataset` is a COCO ground-truth dict that COCOeval("bbox") can use.

    Requires "images" (objects with a unique integer "id"), "categories" (unique
    integer "id", optional "name") and "annotations" (unique integer "id", "image_id"
    and "category_id" present in images / categories, "bbox" of 4 finite numbers,
    numeric "area", "iscrowd" 0 or 1), as COCOeval needs (`coco_format.coco_gt_problem`).

    Raises:
      EvaluationInputError: "<source> is not a COCO ground-truth file: <problem>".
    """
    problem = coco_gt_problem(dataset)
    if problem:
        raise EvaluationInputError(f"{source} is not a COCO ground-truth file: {problem}")


def _segmentation_problem(seg, size) -> str | None:
    """Why `seg` is not a COCO compressed RLE of an image of `size` (height, width), or None."""
    if not isinstance(seg, dict) or set(seg) != {"size", "counts"}:
        return f"must be a COCO compressed RLE {{'size': [height, width], 'counts': str}}, got {json_kind(seg)}"
    if not isinstance(seg["counts"], (str, bytes)):
        return f"'counts' must be a string (compressed RLE), got {json_kind(seg['counts'])}"
    hw = seg["size"]
    if not (isinstance(hw, (list, tuple)) and len(hw) == 2 and all(is_int(v) and v >= 0 for v in hw)):
        return f"'size' must be [height, width] (2 integers), got {hw!r}"
    if size is not None and list(hw) != list(size):
        return f"'size' {list(hw)} is not the image's [height, width] {list(size)}"
    return None


def check_coco_results(
    results, image_ids, category_ids, source: str = "detections", gt_source: str = "ground truth", image_sizes=None
) -> tuple[bool, bool]:
    """Checks a COCO results list against the GT it will be evaluated on.

    Args:
      results: list of {"image_id": int, "category_id": int, "score": finite number} with
        "bbox": [x, y, w, h] (finite, w and h >= 0) and / or "segmentation": a COCO
        compressed RLE {"size": [height, width], "counts": str}. Every result carries
        the same ones of the two.
      image_ids, category_ids: the GT's image and category ids (sets or sequences).
      source, gt_source: names used in error messages (e.g. "detections file 'r.json'").
      image_sizes: optional {image_id: (height, width)}: each segmentation's size must
        be its image's.
    Returns:
      (has_bbox, has_segmentation) of the results (both False for an empty list).
    Raises:
      EvaluationInputError: naming `source`, the first offending result and the problem;
        result image ids / category ids absent from the GT are errors (pycocotools
        rejects the former with a bare assert and silently ignores the latter, which
        usually means a label -> category id mapping bug).
    """
    prefix = f"{source} is not a COCO results list"
    if not isinstance(results, list):
        hint = " (a COCO ground-truth file?)" if isinstance(results, dict) and "annotations" in results else ""
        raise EvaluationInputError(
            f"{prefix}: top level is {json_kind(results)}{hint}, expected a list of {{image_id, category_id, bbox, score}}"
        )
    image_ids, category_ids = set(image_ids), set(category_ids)
    bad_images, bad_categories = [], []
    has_bbox = has_segm = False
    for n, r in enumerate(results):
        if not isinstance(r, dict):
            raise EvaluationInputError(f"{prefix}: item {n} is {json_kind(r)}, expected an object")
        if n == 0:
            has_bbox, has_segm = "bbox" in r, "segmentation" in r
            if not (has_bbox or has_segm):
                raise EvaluationInputError(f"{prefix}: item 0 has neither 'bbox' nor 'segmentation'")
        for key, present in (("bbox", has_bbox), ("segmentation", has_segm)):
            if (key in r) != present:
                raise EvaluationInputError(
                    f"{prefix}: item {n} {'has' if key in r else 'has no'} '{key}' but item 0 "
                    f"{'does not' if key in r else 'does'} (every result must carry the same fields)"
                )
        for key in ("image_id", "category_id"):
            if not is_int(r.get(key)):
                raise EvaluationInputError(f"{prefix}: item {n} has no integer '{key}' (got {r.get(key)!r})")
        if has_bbox:
            if not is_box(r.get("bbox")):
                raise EvaluationInputError(
                    f"{prefix}: item {n} 'bbox' must be 4 finite numbers [x, y, width, height], got {r.get('bbox')!r}"
                )
            if r["bbox"][2] < 0 or r["bbox"][3] < 0:
                raise EvaluationInputError(
                    f"{prefix}: item {n} 'bbox' {r['bbox']!r} has a negative width or height "
                    "(expected [x, y, width, height])"
                )
        if has_segm:
            size = None if image_sizes is None else image_sizes.get(r["image_id"])
            problem = _segmentation_problem(r["segmentation"], size)
            if problem:
                raise EvaluationInputError(f"{prefix}: item {n} (image id {r['image_id']}) 'segmentation' {problem}")
        if not is_real(r.get("score")):
            raise EvaluationInputError(f"{prefix}: item {n} has no finite numeric 'score' (got {r.get('score')!r})")
        if r["image_id"] not in image_ids:
            bad_images.append(r["image_id"])
        if r["category_id"] not in category_ids:
            bad_categories.append(r["category_id"])
    if bad_images:
        raise EvaluationInputError(
            f"{source}: {len(bad_images)} results refer to image ids not in {gt_source} "
            f"(e.g. {sorted(set(bad_images))[:5]})"
        )
    if bad_categories:
        raise EvaluationInputError(
            f"{source}: {len(bad_categories)} results have category ids not in {gt_source} "
            f"(e.g. {sorted(set(bad_categories))[:5]})"
        )
    return has_bbox, has_segm


def check_coco_gt_segmentation(coco, source: str = "ground truth") -> None:
    """Checks that every GT annotation's "segmentation" is one pycocotools reads.

    Polygons (a list of parts, each a list of x, y numbers), uncompressed RLE
    ({"size", "counts": [int, ...]}, crowd regions) and compressed RLE ({"size",
    "counts": str}) are read by `COCO.annToRLE` with the image's "height" / "width";
    each is converted once here (the result is not kept: the GT is not modified), so a
    bad one is named before COCOeval fails on it.

    Args:
      coco: a `pycocotools.coco.COCO` with its index built.
    Raises:
      EvaluationInputError: "<source>: annotation id N (image id I) has a malformed
        'segmentation': <why>" for the first annotation that has none, an unreadable
        one, or an RLE whose size is not its image's [height, width].
    """
    for ann in coco.dataset["annotations"]:
        where = f"{source}: annotation id {ann['id']} (image id {ann['image_id']})"
        image = coco.imgs[ann["image_id"]]
        if not (is_int(image.get("height")) and is_int(image.get("width"))):
            raise EvaluationInputError(f"{where}: its image has no integer 'height' and 'width' (needed for masks)")
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            hw = seg.get("size")
            if not (isinstance(hw, (list, tuple)) and len(hw) == 2 and all(is_int(v) for v in hw)):
                raise EvaluationInputError(f"{where} has a malformed 'segmentation': RLE 'size' {hw!r}")
            if list(hw) != [image["height"], image["width"]]:
                raise EvaluationInputError(
                    f"{where} has a malformed 'segmentation': RLE size {list(hw)} is not the image's "
                    f"[height, width] {[image['height'], image['width']]}"
                )
            counts = seg.get("counts")
            if isinstance(counts, list):
                if not all(is_int(c) and c >= 0 for c in counts) or sum(counts) != hw[0] * hw[1]:
                    raise EvaluationInputError(
                        f"{where} has a malformed 'segmentation': uncompressed RLE counts must be non-negative "
                        f"integers summing to height * width = {hw[0] * hw[1]}"
                    )
            elif not isinstance(counts, (str, bytes)):
                raise EvaluationInputError(
                    f"{where} has a malformed 'segmentation': RLE 'counts' is {json_kind(counts)}, "
                    "expected a list of integers or a string"
                )
        elif isinstance(seg, list):
            if not seg or not all(
                isinstance(p, list) and len(p) >= 4 and len(p) % 2 == 0 and all(is_real(v) for v in p) for p in seg
            ):
                raise EvaluationInputError(
                    f"{where} has a malformed 'segmentation': polygons must be a non-empty list of parts, "
                    "each a list of an even number (>= 4) of finite x, y coordinates"
                )
        elif "segmentation" not in ann:
            raise EvaluationInputError(f"{where} has no 'segmentation' (needed for segm evaluation)")
        else:
            raise EvaluationInputError(
                f"{where} has a malformed 'segmentation': {json_kind(seg)} (expected polygons or an RLE object)"
            )
        try:
            coco.annToRLE(ann)
        except Exception as e:  # pycocotools raises bare Exceptions / TypeErrors
            raise EvaluationInputError(
                f"{where} has a malformed 'segmentation': pycocotools cannot read it ({e})"
            ) from None


def load_coco_gt(gt):
    """A checked `pycocotools.coco.COCO` from a path, a COCO-format dict or a COCO object.

    Returns:
      (coco, source): the COCO object and the name used for it in messages.
    Raises:
      EvaluationInputError: the file is missing, not JSON, or not COCO ground truth.
    """
    from pycocotools.coco import COCO

    if isinstance(gt, COCO):
        source = "ground truth"
        check_coco_gt(gt.dataset, source)
        return gt, source
    if isinstance(gt, dict):
        dataset, source = gt, "ground truth"
    else:
        source = f"annotations file '{os.fspath(gt)}'"
        dataset = load_json(gt, "annotations file")
    check_coco_gt(dataset, source)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, source


# --------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CocoEvalResult:
    """What `evaluate_coco` measured.

    Attributes:
      stats: {key: float} for the 12 STAT_KEYS, pycocotools' `COCOeval.stats` at full
        precision (-1.0 where pycocotools reports -1: no GT in that area range).
      per_class: {category name: AP@[.5:.95] (area all, maxDets 100) or None when the
        category has no (non-crowd) GT}, in GT category id order.
      precision: [T=10, R=101, K, A=4, M=3] float64, `COCOeval.eval["precision"]`
        (-1 where a category has no GT).
      recall: [T, K, A, M] float64, `COCOeval.eval["recall"]`.
      iou_thresholds: [T] float64 (0.5, 0.55, ..., 0.95).
      recall_thresholds: [R] float64 (0, 0.01, ..., 1).
      category_ids: [K] GT category ids, the K axis order; category_names likewise.
      summary: pycocotools' standard 12-line summary text (as `summarize()` prints it).
      detections: the evaluated COCO results list (unmodified input dicts).
      num_images: number of GT images evaluated.
      iou_type: "bbox" or "segm", what these numbers measure.
      segm: for results with "segmentation", the mask ("segm") evaluation's own
        CocoEvalResult (same fields, iou_type "segm"); None otherwise.
    """

    stats: dict
    per_class: dict
    precision: np.ndarray
    recall: np.ndarray
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    category_ids: tuple
    category_names: tuple
    summary: str
    detections: list
    num_images: int
    iou_type: str = "bbox"
    segm: CocoEvalResult | None = None

    def metrics(self) -> dict:
        """JSON-ready {STAT_KEYS...: float, "per_class": {name: float | None}} (what metrics.json holds),
        plus "segm": {STAT_KEYS...: float, "per_class": {...}} when masks were evaluated."""
        out = {**{k: self.stats[k] for k in STAT_KEYS}, "per_class": dict(self.per_class)}
        if self.segm is not None:
            out["segm"] = self.segm.metrics()
        return out


def per_class_ap(precision: np.ndarray, names: Sequence[str]) -> dict:
    """Detectron2's per-category AP from `COCOeval.eval["precision"]`.

    Args:
      precision: [T, R, K, A, M] (area index 0 = "all", last maxDets = 100 are used).
      names: [K] category names.
    Returns:
      {name: mean of precision[:, :, k, 0, -1] over entries > -1, as float; None when
      there are none (no GT for the category)}. Unlike Detectron2, not multiplied by 100.
    """
    out = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[name] = float(np.mean(p)) if p.size else None
    return out


def _category_names(coco) -> tuple[tuple, tuple]:
    ids = tuple(sorted(coco.getCatIds()))
    names = [str(coco.cats[i].get("name", i)) for i in ids]
    if len(set(names)) != len(names):  # keys of per_class must be unique
        names = [f"{n} (id {i})" for n, i in zip(names, ids)]
    return ids, tuple(names)


def _empty_results(coco_gt):
    """A results COCO with no detections (`COCO.loadRes([])` fails on `anns[0]`)."""
    from pycocotools.coco import COCO

    res = COCO()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    res.createIndex()
    return res


def _cocoeval(coco_gt, detections, iou_type: str, source_detections: list) -> CocoEvalResult:
    """COCOeval(gt, dt, iou_type) with default parameters on already checked results."""
    from pycocotools.cocoeval import COCOeval

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if detections:
            coco_dt = coco_gt.loadRes(detections)
        else:
            coco_dt = _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()

    ids, names = _category_names(coco_gt)
    assert list(ids) == list(coco_eval.params.catIds)
    precision = np.asarray(coco_eval.eval["precision"], np.float64)
    return CocoEvalResult(
        stats={k: float(v) for k, v in zip(STAT_KEYS, coco_eval.stats)},
        per_class=per_class_ap(precision, names),
        precision=precision,
        recall=np.asarray(coco_eval.eval["recall"], np.float64),
        iou_thresholds=np.asarray(coco_eval.params.iouThrs, np.float64),
        recall_thresholds=np.asarray(coco_eval.params.recThrs, np.float64),
        category_ids=ids,
        category_names=names,
        summary=summary.getvalue(),
        detections=source_detections,
        num_images=len(coco_eval.params.imgIds),
        iou_type=iou_type,
    )


def evaluate_coco(gt, detections) -> CocoEvalResult:
    """COCO box AP (and mask AP): pycocotools' COCOeval(gt, dt, "bbox") (and "segm") with default parameters.

    Args:
      gt: path of a COCO-format annotations JSON, the parsed dict, or a
        `pycocotools.coco.COCO`.
      detections: path of a COCO results JSON or the list of result dicts
        ({"image_id", "category_id", "bbox": [x, y, w, h], "score"}, and / or
        "segmentation": COCO compressed RLE at the original image size; see
        `to_coco_results` and `to_coco_results_with_masks`). The list is not modified.
    Returns:
      CocoEvalResult of the bbox evaluation; `.segm` holds the segm evaluation's when
      the results carry "segmentation" (see the module doc: segm is evaluated without
      the results' boxes; results without "bbox" get their mask's extent as box).
      `.metrics()` is the JSON-ready dict of the 12 stats and per-class AP (plus
      "segm"), `.summary` the standard 12-line summary (pycocotools' own stdout is
      captured, not printed).

    Every GT image is evaluated (images without detections count as misses), exactly
    as `COCOeval(...).evaluate(); accumulate(); summarize()`. An empty detections list
    is valid (pycocotools' `loadRes` cannot take it, so an empty results set is built
    directly): every stat is 0.0, except -1.0 where the GT has no box in that area
    range, as pycocotools reports.

    Raises:
      EvaluationInputError: a file is missing / not JSON / not the expected structure,
        results refer to image or category ids absent from the GT, or (for masks) a
        result's or GT annotation's segmentation is malformed (the annotation id named).
    """
    coco_gt, gt_source = load_coco_gt(gt)
    if isinstance(detections, (str, os.PathLike)):
        dt_source = f"detections file '{os.fspath(detections)}'"
        detections = load_json(detections, "detections file")
    else:
        dt_source = "detections"
    if isinstance(detections, tuple):
        detections = list(detections)
    sizes = {i: (im.get("height"), im.get("width")) for i, im in coco_gt.imgs.items()}
    has_bbox, has_segm = check_coco_results(
        detections, coco_gt.getImgIds(), coco_gt.getCatIds(), dt_source, gt_source, image_sizes=sizes
    )
    if has_segm:
        check_coco_gt_segmentation(coco_gt, gt_source)
    # loadRes adds keys (area, id, iscrowd, segmentation / bbox) to the dicts it gets: copies.
    if has_segm and not has_bbox:
        from pycocotools import mask as mask_utils

        box_dets = [
            {k: v for k, v in d.items() if k != "segmentation"}
            | {"bbox": [float(v) for v in mask_utils.toBbox(_rle(d["segmentation"]))]}
            for d in detections
        ]
    else:
        box_dets = [{k: v for k, v in d.items() if k != "segmentation"} for d in detections]
    # COCOeval writes into the GT annotations ("ignore"; "segm" replaces each segmentation by
    # its RLE): it runs on copies, so the caller's ground truth (dict or COCO) is left as it was.
    eval_gt = _with_copied_annotations(coco_gt)
    result = _cocoeval(eval_gt, box_dets, "bbox", detections)
    if has_segm:
        segm_dets = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
        result = dataclasses.replace(result, segm=_cocoeval(eval_gt, segm_dets, "segm", detections))
    return result


def _with_copied_annotations(coco_gt):
    """A `COCO` over the same images / categories with shallow copies of the annotation dicts."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = {**coco_gt.dataset, "annotations": [dict(a) for a in coco_gt.dataset["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _rle(seg: dict) -> dict:
    """A compressed RLE with bytes counts (what pycocotools' mask functions take)."""
    counts = seg["counts"]
    return {"size": seg["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
