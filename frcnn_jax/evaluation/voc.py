"""Pascal VOC detection AP (the devkit's `VOCevaldet` / py-faster-rcnn's `voc_eval`).

Conventions (state them when quoting numbers):

- Boxes are (x1, y1, x2, y2) floats with torchvision's convention: width = x2 - x1,
  NO "+1" pixel (tfds VOC boxes are normalised floats, where "+1" is meaningless).
  Numbers on integer pixel boxes therefore differ slightly from the devkit's, which
  adds 1 to widths and heights.
- A detection is a true positive when its IoU with the best-overlapping GT box of its
  class in its image is >= 0.5 (the devkit's `ovmax >= minoverlap`; py-faster-rcnn
  uses `> 0.5`) and that GT box is not yet matched. Detections are taken in decreasing
  score order (stable: ties keep image order, then detection order); each GT box is
  matched at most once; a detection whose best GT is already matched is a false
  positive (no fallback to the second-best GT), as in the devkit.
- "difficult" GT boxes are not counted as positives, and a detection whose best GT is
  difficult is neither a true nor a false positive (it is ignored).
- Two AP definitions, both reported:
  * "07_11point": VOC2007's 11-point interpolated AP: mean over recall levels
    t in {0, 0.1, ..., 1.0} of max(precision at recall >= t) (0 if never reached).
    The levels are the exact decimals k / 10 (py-faster-rcnn's `np.arange(0, 1.1, 0.1)`
    gives 0.30000000000000004 etc., which differs only when a recall equals 0.3, 0.6
    or 0.7 exactly).
  * "area": VOC2010+ AP, the area under the precision-recall curve after making
    precision monotonically non-increasing (py-faster-rcnn's `use_07_metric=False`).
- A class with no non-difficult GT box has AP None and is left out of the mAP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from frcnn_jax.host_boxes import iou_one_to_many

IOU_THRESHOLD = 0.5


def voc_ap(recall, precision, use_07_metric: bool) -> float:
    """AP from a precision-recall curve.

    Args:
      recall: [N] float, cumulative recall after each detection (non-decreasing).
      precision: [N] float, cumulative precision after each detection.
      use_07_metric: True for VOC2007's 11-point interpolated AP, False for the
        area under the interpolated curve (VOC2010+).
    Returns:
      AP as a Python float in [0, 1]; 0.0 for an empty curve.
    """
    rec = np.asarray(recall, np.float64).reshape(-1)
    prec = np.asarray(precision, np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"voc_ap: recall has shape {rec.shape} but precision has {prec.shape}")
    if use_07_metric:
        levels = []
        for k in range(11):
            reached = rec >= k / 10
            levels.append(float(np.max(prec[reached])) if reached.any() else 0.0)
        return sum(levels) / 11
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def match_detections(gt_boxes, gt_difficult, det_boxes, det_scores, iou_threshold: float = IOU_THRESHOLD):
    """True / false positives of one class over several images.

    Args:
      gt_boxes: per image [G_i, 4] float (x1, y1, x2, y2) GT boxes of the class.
      gt_difficult: per image [G_i] bool.
      det_boxes: per image [D_i, 4] float detections of the class.
      det_scores: per image [D_i] float.
      iou_threshold: minimum IoU (inclusive) for a match.
    Returns:
      (tp, fp, num_positives): tp, fp [D] float64 0/1 indicators in decreasing score
      order (both 0 for detections ignored because they hit a difficult GT box), and
      the number of non-difficult GT boxes.
    """
    num_pos = int(sum(int(np.sum(~np.asarray(d, bool))) for d in gt_difficult))
    empty = [np.zeros(0, np.int64)]
    image_of = np.concatenate([np.full(len(s), i, np.int64) for i, s in enumerate(det_scores)] + empty)
    index_in = np.concatenate([np.arange(len(s), dtype=np.int64) for s in det_scores] + empty)
    scores = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in det_scores] + [np.zeros(0)])
    order = np.argsort(-scores, kind="stable")
    matched = [np.zeros(len(g), bool) for g in gt_boxes]
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for rank, d in enumerate(order):
        i = image_of[d]
        gts = np.asarray(gt_boxes[i], np.float64).reshape(-1, 4)
        box = np.asarray(det_boxes[i], np.float64).reshape(-1, 4)[index_in[d]]
        if len(gts) == 0:
            fp[rank] = 1
            continue
        ious = iou_one_to_many(box, gts)
        j = int(np.argmax(ious))
        if ious[j] >= iou_threshold:
            if gt_difficult[i][j]:
                continue
            if not matched[i][j]:
                matched[i][j] = True
                tp[rank] = 1
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    return tp, fp, num_pos


def _check_length(name, arr, n):
    if arr.shape != (n,):
        raise ValueError(f"evaluate_voc: {name} has shape {arr.shape}, expected ({n},) (one per box)")


def evaluate_voc(
    gt_per_image: Sequence[Mapping],
    detections_per_image: Sequence[Mapping],
    num_object_classes: int,
    category_names: Sequence[str] | None = None,
    iou_threshold: float = IOU_THRESHOLD,
) -> dict:
    """Pascal VOC per-class AP and mAP, with both AP definitions (see module docstring).

    Args:
      gt_per_image: one dict per image: "boxes" [N, 4] float (x1, y1, x2, y2),
        "labels" [N] int in 1..num_object_classes, optional "difficult" [N] bool (default
        all False).
      detections_per_image: one dict per image, same order: "boxes" [K, 4] float (same
        coordinate frame as the GT), "scores" [K] float, "labels" [K] int, optional
        "valid" [K] bool; entries with valid False or label 0 (padding) are dropped.
      num_object_classes: number of foreground classes C (labels 1..C, background excluded).
      category_names: C names for labels 1..C (default "class_1", ...).
      iou_threshold: minimum IoU for a true positive (0.5 for VOC).
    Returns:
      {"AP_07_11point": {name: float | None}, "AP_area": {name: float | None},
       "mAP_07_11point": float, "mAP_area": float, "num_positives": {name: int}}.
      AP is None for a class without non-difficult GT; the mAPs average the other
      classes (NaN if there are none).
    Raises:
      ValueError: mismatched lengths or shapes, labels outside 1..C.
    """
    if category_names is None:
        category_names = tuple(f"class_{c}" for c in range(1, num_object_classes + 1))
    if len(category_names) != num_object_classes:
        raise ValueError(
            f"evaluate_voc: {len(category_names)} category_names for num_object_classes={num_object_classes}; "
            "num_object_classes counts foreground classes only (labels 1..C, no background)"
        )
    if len(set(category_names)) != len(category_names):
        raise ValueError("evaluate_voc: category_names must be unique")
    if len(gt_per_image) != len(detections_per_image):
        raise ValueError(
            f"evaluate_voc: {len(gt_per_image)} GT images but {len(detections_per_image)} detection images"
        )

    gts, dets = [], []
    for n, (g, d) in enumerate(zip(gt_per_image, detections_per_image)):
        gb = np.asarray(g["boxes"], np.float64).reshape(-1, 4) if len(g["boxes"]) else np.zeros((0, 4))
        gl = np.asarray(g["labels"], np.int64).reshape(-1)
        gd = np.asarray(g.get("difficult", np.zeros(len(gl), bool)), bool).reshape(-1)
        _check_length(f"GT image {n} labels", gl, len(gb))
        _check_length(f"GT image {n} difficult", gd, len(gb))
        if gl.size and (gl.min() < 1 or gl.max() > num_object_classes):
            raise ValueError(
                f"evaluate_voc: GT image {n} has labels outside 1..{num_object_classes}: {sorted(set(gl.tolist()))}"
            )
        db = np.asarray(d["boxes"], np.float64).reshape(-1, 4) if len(d["boxes"]) else np.zeros((0, 4))
        ds = np.asarray(d["scores"], np.float64).reshape(-1)
        dl = np.asarray(d["labels"], np.int64).reshape(-1)
        _check_length(f"detections image {n} scores", ds, len(db))
        _check_length(f"detections image {n} labels", dl, len(db))
        keep = dl != 0
        if "valid" in d:
            dv = np.asarray(d["valid"], bool).reshape(-1)
            _check_length(f"detections image {n} valid", dv, len(db))
            keep &= dv
        if keep.any() and (dl[keep].min() < 1 or dl[keep].max() > num_object_classes):
            raise ValueError(f"evaluate_voc: detections image {n} has labels outside 1..{num_object_classes}")
        gts.append((gb, gl, gd))
        dets.append((db[keep], ds[keep], dl[keep]))

    ap07, ap_area, npos = {}, {}, {}
    for c, name in enumerate(category_names, start=1):
        tp, fp, num_pos = match_detections(
            [gb[gl == c] for gb, gl, _ in gts],
            [gd[gl == c] for _, gl, gd in gts],
            [db[dl == c] for db, _, dl in dets],
            [ds[dl == c] for _, ds, dl in dets],
            iou_threshold,
        )
        npos[name] = num_pos
        if num_pos == 0:
            ap07[name] = ap_area[name] = None
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec = tp / num_pos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap07[name] = voc_ap(rec, prec, use_07_metric=True)
        ap_area[name] = voc_ap(rec, prec, use_07_metric=False)

    def mean(aps):
        vals = [v for v in aps.values() if v is not None]
        return float(np.mean(vals)) if vals else float("nan")

    return {
        "AP_07_11point": ap07,
        "AP_area": ap_area,
        "mAP_07_11point": mean(ap07),
        "mAP_area": mean(ap_area),
        "num_positives": npos,
    }
