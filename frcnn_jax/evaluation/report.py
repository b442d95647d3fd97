"""Writing evaluation outputs (metrics.json, detections.json, the PR plot) and the per-class table."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping

import numpy as np

from frcnn_jax.evaluation.plots import plot_precision_recall
from frcnn_jax.io_utils import write_atomic

COCO_METRICS_FILE = "metrics.json"  # eval.py: COCO metrics (the training log is training.metrics.TRAIN_METRICS_FILE)
DETECTIONS_FILE = "detections.json"
PR_PLOT_FILE = "precision_recall.png"


def _json_safe(value):
    """numpy scalars / arrays -> Python numbers / lists, NaN / inf -> None (strict JSON), bytes -> str, recursively."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):  # e.g. the counts of an RLE straight from pycocotools.mask.encode
        return value.decode("ascii", "backslashreplace")
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path, obj, indent: int | None = 1) -> pathlib.Path:
    """Writes `obj` as strict JSON (NaN -> null, floats at full repr precision), atomically.

    numpy scalars and arrays are written as Python numbers and lists.

    The file is written next to `path` and renamed over it, so a reader never sees a
    partial file and `path` may be the file `obj` was read from.
    """
    return write_atomic(path, json.dumps(_json_safe(obj), indent=indent, allow_nan=False) + "\n")


def write_metrics_json(path, result) -> pathlib.Path:
    """metrics.json: exactly {"AP", "AP50", ..., "ARl" (STAT_KEYS): float, "per_class": {name: float | null}}
    (the bbox numbers), plus "segm": {the same 12 keys, "per_class"} when masks were evaluated.

    Args:
      result: a `CocoEvalResult` (or its `.metrics()` dict).
    """
    metrics = result.metrics() if hasattr(result, "metrics") else dict(result)
    return write_json(path, metrics)


def write_detections_json(path, detections) -> pathlib.Path:
    """detections.json: the COCO results list ({"image_id", "category_id", "bbox": [x, y, w, h], "score"},
    and "segmentation" RLE for masks)."""
    return write_json(path, list(detections), indent=None)


def write_coco_report(out_dir, result) -> dict[str, pathlib.Path]:
    """Writes metrics.json, detections.json and precision_recall.png into `out_dir` (created).

    Args:
      out_dir: output directory.
      result: a `CocoEvalResult` from `evaluate_coco`.
    Returns:
      {"metrics": path, "detections": path, "plot": path}.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": write_metrics_json(out / COCO_METRICS_FILE, result),
        "detections": write_detections_json(out / DETECTIONS_FILE, result.detections),
        "plot": out / PR_PLOT_FILE,
    }
    plot_precision_recall(result, paths["plot"])
    return paths


def format_per_class_table(
    per_class: Mapping[str, float | None],
    columns: int = 3,
    title: str = "AP",
    segm: Mapping[str, float | None] | None = None,
) -> str:
    """A fixed-width text table of per-class AP, `columns` (name, AP) cells per row.

    Args:
      per_class: {name: AP in [0, 1] or None (no GT, shown as "-")}.
      segm: optional {name: mask (segm) AP or None} for the same classes: each cell then
        shows the box AP (column "box AP") and the mask AP ("mask AP").
    Returns:
      the table as a string (no trailing newline); AP printed with 3 decimals like
      pycocotools' summary.
    """
    fmt = lambda v: "-" if v is None or math.isnan(v) else f"{v:.3f}"  # noqa: E731
    items = [(str(k), [fmt(v)] + ([] if segm is None else [fmt(segm.get(k))])) for k, v in per_class.items()]
    if not items:
        return "(no categories)"
    titles = [title] if segm is None else ["box AP", "mask AP"]
    name_w = max(len("category"), *(len(n) for n, _ in items))
    val_ws = [max(len(t), *(len(vals[i]) for _, vals in items)) for i, t in enumerate(titles)]
    columns = max(1, min(columns, len(items)))

    def cell(name, values):
        return f"{name:<{name_w}} " + " ".join(f"{v:>{w}}" for v, w in zip(values, val_ws))

    sep = " | "
    header = sep.join([cell("category", titles)] * columns)
    lines = [header, "-" * len(header)]
    for start in range(0, len(items), columns):
        lines.append(sep.join(cell(n, v) for n, v in items[start : start + columns]).rstrip())
    return "\n".join(lines)
