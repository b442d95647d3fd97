"""Batched, jitted inference of a model over a dataset split, then COCO (and VOC) evaluation.

Used by the training loop (periodic and final evaluation) and by `eval.py`. Unlike the
rest of `frcnn_jax.evaluation` this module needs JAX (the package itself imports
without it).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from tqdm import tqdm

from frcnn_jax.data import builder as data_lib
from frcnn_jax.evaluation.coco import evaluate_coco, to_coco_results
from frcnn_jax.modeling.faster_rcnn import FasterRCNN
from frcnn_jax.modeling.postprocess import rescale_boxes


def _variables(state_or_variables):
    if isinstance(state_or_variables, dict):
        return state_or_variables
    return {"params": state_or_variables.params, "frozen": state_or_variables.frozen}


@functools.lru_cache(maxsize=8)
def _forward(model: FasterRCNN):
    return jax.jit(lambda v, images, sizes: model.apply(v, images, sizes))


def predict_dataset(model: FasterRCNN, variables, source, data_cfg, *, max_images: int = 0, progress: bool = True):
    """Detections for every image of `source` (or the first `max_images`).

    Yields (batch, detections) per batch, detections in ORIGINAL image pixels:
    boxes [B, D, 4], scores [B, D], labels [B, D], valid [B, D] (numpy; padding
    examples of the last batch have valid all False).
    """
    variables = _variables(variables)
    forward = _forward(model)
    total = len(source) if not max_images else min(max_images, len(source))
    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    for batch in data_lib.eval_iterator(source, data_cfg, max_images=max_images):
        out = jax.device_get(forward(variables, batch["image"], batch["image_size"]))
        boxes = np.stack([np.asarray(rescale_boxes(out["boxes"][i], batch["image_size"][i], batch["orig_size"][i])) for i in range(len(out["boxes"]))])
        valid = out["valid"] & batch["valid"][:, None]
        bar.update(int(batch["valid"].sum()))
        yield batch, {"boxes": boxes, "scores": out["scores"], "labels": out["labels"], "valid": valid}
    bar.close()


def evaluate_model(
    model: FasterRCNN, variables, source, config, *, label_to_category_id=None, max_images=None, progress: bool = True,
    voc: bool = False,
):
    """COCO box AP of the model on `source` -> `CocoEvalResult` (and VOC AP when voc=True).

    label_to_category_id: how model labels map to the source's category ids (default:
    the source's own map; torchvision's 91-class COCO models predict COCO ids directly).
    max_images: evaluate the first N images only (default config.train.eval_max_images).
    Returns the COCO result, or (COCO result, VOC metrics dict) with voc=True.
    """
    mapping = source.label_to_category_id if label_to_category_id is None else label_to_category_id
    max_images = config.train.eval_max_images if max_images is None else max_images
    results, seen, voc_gt, voc_dt = [], [], [], []
    labels_known = np.asarray(sorted(int(k) for k in mapping), np.int64)
    for batch, det in predict_dataset(model, variables, source, config.data, max_images=max_images, progress=progress):
        det["valid"] &= np.isin(det["labels"], labels_known)  # classes this dataset does not have
        ids = batch["image_id"][batch["valid"]]
        seen.extend(int(i) for i in ids)
        results += to_coco_results(batch["image_id"], det["boxes"], det["scores"], det["labels"], mapping, det["valid"])
        if voc:
            for i in np.flatnonzero(batch["valid"]):
                voc_dt.append({k: det[k][i] for k in ("boxes", "scores", "labels", "valid")})
    gt = source.coco_gt()
    if max_images:
        keep = set(seen)
        gt = dict(gt, images=[im for im in gt["images"] if im["id"] in keep], annotations=[a for a in gt["annotations"] if a["image_id"] in keep])
    coco = evaluate_coco(gt, results)
    if not voc:
        return coco
    from frcnn_jax.evaluation.voc import evaluate_voc

    # VOC ground truth per evaluated image, in the order the detections came out.
    by_id = {}
    for im in gt["images"]:
        by_id[im["id"]] = {"boxes": [], "labels": [], "difficult": []}
    label_of = {int(c): int(lab) for lab, c in mapping.items()}
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        entry = by_id[a["image_id"]]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["labels"].append(label_of[int(a["category_id"])])
        entry["difficult"].append(bool(a.get("iscrowd", 0)))  # VOC difficult boxes are stored as iscrowd
    for image_id in seen:
        e = by_id[image_id]
        voc_gt.append({"boxes": np.asarray(e["boxes"], np.float32).reshape(-1, 4), "labels": np.asarray(e["labels"], np.int64),
                       "difficult": np.asarray(e["difficult"], bool)})  # fmt: skip
    names = list(source.class_names)
    return coco, evaluate_voc(voc_gt, voc_dt, len(names), names)


def predictions_png(model_cfg, variables, source, config, path, class_names, *, count: int | None = None, score_threshold: float = 0.5):
    """A grid PNG of the first `count` images of `source` with their detections ("name: score")."""
    from PIL import Image

    from frcnn_jax.detector import Detector
    from frcnn_jax.visualize import draw_detections

    count = min(count or config.train.visualize, len(source))
    detector = Detector(
        model_cfg, _variables(variables), class_names=class_names, min_size=config.data.test_min_size,
        max_size=config.data.max_size, canvases=config.data.canvases, score_threshold=score_threshold,
        batch_size=config.data.eval_batch_size,  # the evaluation's program shape: no new compile
    )  # fmt: skip
    images = [source[i]["image"] for i in range(count)]
    tiles = []
    for im, d in zip(images, detector(images)):
        scale = max(1, 256 // max(im.shape[:2]))  # small images (shapes: 128 px) drawn 2x for legible captions
        if scale > 1:
            im = np.repeat(np.repeat(im, scale, axis=0), scale, axis=1)
        tiles.append(draw_detections(im, d["boxes"] * scale, d["scores"], d["labels"], class_names))
    if not tiles:
        return None
    cols = min(4, len(tiles))
    rows = -(-len(tiles) // cols)
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * w, (k // cols) * h))
    grid.save(path)
    return path
