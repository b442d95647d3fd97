"""Batched, jitted inference of a model over a dataset split, then COCO (and VOC) evaluation.

Used by the training loop (periodic and final evaluation) and by `eval.py`. Unlike the
rest of `frcnn_jax.evaluation` this module needs JAX (the package itself imports
without it).

Multi-process runs split the images across processes: process i predicts images
i::num_processes of the split on its own devices (with its host copy of the replicated
parameters), the fixed-shape detections of every process are gathered to all of them
(`multihost_utils.process_allgather`), and every process computes the same COCO metrics
from the whole split (process 0 alone writes them, see the training loop). The metrics
equal a single-process evaluation: COCO matching is per image, and pycocotools orders
images by id. This needs equally many batches per process, which holds with a single
canvas (multi-process training requires one).
"""

from __future__ import annotations

import jax
import numpy as np
from tqdm import tqdm

from frcnn_jax.data import builder as data_lib
from frcnn_jax.data.transforms import resize_boxes
from frcnn_jax.evaluation.coco import evaluate_coco, to_coco_results, to_coco_results_with_masks
from frcnn_jax.modeling import cpu_kernels as cpu_kernels_lib
from frcnn_jax.modeling.faster_rcnn import FasterRCNN


def _variables(state_or_variables):
    if isinstance(state_or_variables, dict):
        return state_or_variables
    return {"params": state_or_variables.params, "frozen": state_or_variables.frozen}


def make_forward(model: FasterRCNN):
    """The jitted inference of `model`: (variables, images float32 [B, H, W, 3], sizes int32 [B, 2]) -> detections.

    Build it once per model and pass it to `predict_dataset` / `evaluate_model` as
    `forward=` to reuse its compiled programs across evaluations (one per canvas).
    """
    options = cpu_kernels_lib.compiler_options(model.cfg.cpu_kernels) or None
    return jax.jit(lambda v, images, sizes: model.apply(v, images, sizes), compiler_options=options)


def predict_dataset(
    model: FasterRCNN, variables, source, data_cfg, *, max_images: int = 0, progress: bool = True,
    shard_index: int = 0, shard_count: int = 1, forward=None,
):  # fmt: skip
    """Detections for every image of `source` (or the first `max_images`; shard_index::shard_count of them).

    Yields (batch, detections) per batch, detections in ORIGINAL image pixels:
    boxes [B, D, 4], scores [B, D], labels [B, D], valid [B, D] (numpy; padding
    examples of the last batch have valid all False), and for a Mask R-CNN model masks
    [B, D, M, M] float32 (probabilities in each box's frame, unpasted). forward:
    `make_forward(model)` (default: a new one, compiled on first use).
    """
    variables = _variables(variables)
    forward = make_forward(model) if forward is None else forward
    total = len(source) if not max_images else min(max_images, len(source))
    total = len(range(shard_index, total, shard_count))
    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress, dynamic_ncols=True)
    batches = data_lib.eval_iterator(
        source, data_cfg, max_images=max_images, shard_index=shard_index, shard_count=shard_count
    )
    for batch in batches:
        out = jax.device_get(forward(variables, batch["image"], batch["image_size"]))
        sizes = zip(out["boxes"], batch["image_size"], batch["orig_size"])
        boxes = np.stack([resize_boxes(b, size, orig) for b, size, orig in sizes])  # back to original pixels
        valid = out["valid"] & batch["valid"][:, None]
        bar.update(int(batch["valid"].sum()))
        det = {"boxes": boxes, "scores": out["scores"], "labels": out["labels"], "valid": valid}
        if "masks" in out:
            det["masks"] = out["masks"]
        yield batch, det
    bar.close()


def evaluate_model(
    model: FasterRCNN,
    variables,
    source,
    config,
    *,
    label_to_category_id=None,
    max_images=None,
    progress: bool = True,
    voc: bool = False,
    forward=None,
):
    """COCO box AP (and mask AP) of the model on `source` -> `CocoEvalResult` (and VOC AP when voc=True).

    A Mask R-CNN model is also evaluated on COCO "segm" (the result's `.segm`) when the
    source's `coco_gt()` carries segmentations: each detection's mask is pasted into
    its original image and RLE-encoded one at a time (`to_coco_results_with_masks`,
    threshold 0.5), batch by batch, so neither [K, H, W] arrays nor the split's raw
    masks are held. Without GT segmentations only bbox is evaluated.

    label_to_category_id: how model labels map to the source's category ids (default:
    the source's own map; torchvision's 91-class COCO models predict COCO ids directly).
    max_images: evaluate the first N images only (default config.train.eval_max_images).
    forward: `make_forward(model)`, to reuse compiled programs across calls (default: a new one).
    Returns the COCO result, or (COCO result, VOC metrics dict) with voc=True.
    """
    mapping = source.label_to_category_id if label_to_category_id is None else label_to_category_id
    max_images = config.train.eval_max_images if max_images is None else max_images
    labels_known = np.asarray(sorted(int(k) for k in mapping), np.int64)
    process, processes = jax.process_index(), jax.process_count()
    if processes > 1:  # this host's copy of the replicated parameters; predicts on local devices
        variables = jax.device_get(_variables(variables))
    gt = source.coco_gt()
    with_masks = bool(model.cfg.mask.enabled) and any("segmentation" in a for a in gt["annotations"])
    rows, results = [], []
    predictions = predict_dataset(
        model, variables, source, config.data, max_images=max_images, progress=progress and process == 0,
        shard_index=process, shard_count=processes, forward=forward,
    )  # fmt: skip
    for batch, det in predictions:
        det["valid"] &= np.isin(det["labels"], labels_known)  # classes this dataset does not have
        row = {"image_id": batch["image_id"], "image_valid": batch["valid"], "orig_size": batch["orig_size"], **det}
        if not with_masks:
            row.pop("masks", None)
        elif processes == 1:  # RLE now: the split's raw masks are never held
            results += _row_results(row, mapping)
            row.pop("masks")
        rows.append(row)
    if processes > 1:
        rows = _gather_rows(rows)
    seen, voc_gt, voc_dt = [], [], []
    for row in rows:
        ids = row["image_id"][row["image_valid"]]
        seen.extend(int(i) for i in ids)
        if not with_masks or processes > 1:
            results += _row_results(row, mapping)
        if voc:
            for i in np.flatnonzero(row["image_valid"]):
                voc_dt.append({k: row[k][i] for k in ("boxes", "scores", "labels", "valid")})
    if max_images:
        keep = set(seen)
        gt = dict(
            gt,
            images=[im for im in gt["images"] if im["id"] in keep],
            annotations=[a for a in gt["annotations"] if a["image_id"] in keep],
        )
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
    names = list(source.category_names)
    return coco, evaluate_voc(voc_gt, voc_dt, len(names), names)


def _row_results(row: dict, mapping) -> list[dict]:
    """One batch's detections -> COCO results (with "segmentation" RLEs when the row has "masks").

    row: image_id [B], boxes [B, D, 4] original pixels, scores / labels / valid [B, D],
    orig_size [B, 2] (H, W), optional masks [B, D, M, M] float32.
    """
    if "masks" not in row:
        return to_coco_results(row["image_id"], row["boxes"], row["scores"], row["labels"], mapping, row["valid"])
    out = []
    for i in range(len(row["image_id"])):
        out += to_coco_results_with_masks(
            int(row["image_id"][i]), row["boxes"][i], row["scores"][i], row["labels"][i], row["masks"][i],
            tuple(int(v) for v in row["orig_size"][i]), mapping, row["valid"][i],
        )  # fmt: skip
    return out


def _gather_rows(rows: list[dict]) -> list[dict]:
    """Every process's per-batch detection rows, process by process (a collective: all must call)."""
    from jax.experimental import multihost_utils

    local = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}
    counts = multihost_utils.process_allgather(np.int32(len(rows)))
    if len(set(np.asarray(counts).tolist())) != 1:
        raise ValueError(
            f"evaluation batches per process differ ({np.asarray(counts).tolist()}): multi-process evaluation needs a "
            "single data.canvases entry"
        )
    gathered = multihost_utils.process_allgather(local)  # [processes, batches, ...]
    return [
        {k: v[p, b] for k, v in gathered.items()} for p in range(int(jax.process_count())) for b in range(len(rows))
    ]


def predictions_png(
    model_cfg, variables, source, config, path, class_names, *, count: int | None = None, score_thresh: float = 0.5
):
    """A grid PNG of the first `count` images of `source` with their detections ("name: score").

    A Mask R-CNN model's masks are drawn as translucent fills in their boxes' colours.

    score_thresh: only detections scoring above it are drawn (a filter on the model's
    output: the program stays the evaluation's, no new compile).
    """
    from PIL import Image

    from frcnn_jax import host_masks
    from frcnn_jax.detector import Detector
    from frcnn_jax.visualize import draw_detections

    count = min(count or config.train.visualize, len(source))
    detector = Detector(
        model_cfg, _variables(variables), class_names=class_names, min_size=config.data.test_min_size,
        max_size=config.data.max_size, canvases=config.data.canvases,
        batch_size=config.data.eval_batch_size,  # the evaluation's program shape: no new compile
        mask_output="box",  # pasted below, at the drawn scale
    )  # fmt: skip
    images = [source[i]["image"] for i in range(count)]
    tiles = []
    for im, d in zip(images, detector(images)):
        keep = d["scores"] > score_thresh
        d = {k: v[keep] for k, v in d.items()}
        scale = max(1, 256 // max(im.shape[:2]))  # small images (shapes: 128 px) drawn 2x for legible captions
        if scale > 1:
            im = np.repeat(np.repeat(im, scale, axis=0), scale, axis=1)
        masks = None
        if "masks" in d:
            masks = host_masks.iter_pasted_masks(d["masks"], d["boxes"] * scale, im.shape[:2])
        tiles.append(draw_detections(im, d["boxes"] * scale, d["scores"], d["labels"], class_names, masks=masks))
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
