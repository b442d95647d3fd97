"""Running a serving artifact: `load(FILE)` -> a callable with `Detector`'s interface.

    det = load("model.jaxexport")              # reads model.jaxexport.json and its artifacts
    out = det([image_a, image_b])              # uint8 [H, W, 3] RGB arrays (PIL images work too)
    out[0]["boxes"], out[0]["scores"], out[0]["labels"]   # and out[0]["masks"] for Mask R-CNN

Preprocessing follows the sidecar and is `Detector`'s own (the same resize, normalisation,
canvas choice, batch padding and box rescaling functions), so an artifact exported from
a checkpoint returns exactly what `Detector.from_checkpoint(checkpoint, canvases=...,
batch_size=...)` returns on the platform it runs on. No model code runs: the forward pass
is the deserialised `jax.export.Exported`.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from typing import Any

import jax

from frcnn_jax.detector import BatchedDetector, check_mask_options
from frcnn_jax.export.artifact import SIDECAR_FORMAT, sidecar_path


def read_sidecar(path) -> dict[str, Any]:
    """The sidecar of artifact `path` (`path.json`); FileNotFoundError / ValueError naming the file."""
    side = sidecar_path(path)
    try:
        doc = json.loads(side.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{side} does not exist (the sidecar written beside the artifact {path})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{side}: malformed JSON ({e})") from None
    if doc.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side}: unsupported format {doc.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    return doc


def read_artifact(directory: pathlib.Path, entry: dict) -> jax.export.Exported:
    """Deserialises one sidecar artifact entry ({"file", "bytes", "sha256", ...}), checking its digest."""
    path = directory / entry["file"]
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"artifact {path} does not exist") from None
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise ValueError(f"artifact {path}: content does not match its sidecar (sha256); re-export it")
    return jax.export.deserialize(bytearray(blob))


class ExportedDetector(BatchedDetector):
    """A deserialised artifact with `Detector`'s call interface (`detector.BatchedDetector`).

    Args:
      sidecar: the sidecar document (`read_sidecar`).
      exported: canvas (H, W) -> `jax.export.Exported`.
      score_thresh: keep detections scoring above this; None: the artifact's compiled
        `score_thresh` (sidecar). The post-process is baked into the artifact, so a value
        below the compiled one cannot add detections and raises ValueError (export again
        with `--score-thresh`). `score_threshold` is a deprecated alias.
      batch_size: images per call; default the artifact's batch. A static-batch artifact
        takes at most its batch (partial batches are padded as `Detector` pads them).
      mask_threshold, mask_output: for a Mask R-CNN artifact (its outputs have "masks"),
        each result's `masks`, pasted with `Detector`'s arithmetic (`host_masks`): as
        `Detector`'s arguments ("image" [K, H, W] bool by default, "rle", "box").
    """

    def __init__(
        self,
        sidecar: dict,
        exported: dict,
        *,
        score_thresh: float | None = None,
        batch_size: int | None = None,
        score_threshold: float | None = None,
        mask_threshold: float | None = 0.5,
        mask_output: str = "image",
    ):
        if score_threshold is not None:
            warnings.warn("score_threshold= is deprecated; use score_thresh=", DeprecationWarning, 2)
            score_thresh = score_threshold if score_thresh is None else score_thresh
        self.mask_output, self.mask_threshold = check_mask_options(mask_output, mask_threshold)
        self.has_masks = "masks" in sidecar
        self.sidecar = sidecar
        self.exported = {tuple(c): e for c, e in exported.items()}
        self.canvases = [tuple(c) for c in sidecar["canvases"]]
        pre = sidecar["preprocessing"]
        self.min_size, self.max_size = int(pre["min_size"]), int(pre["max_size"])
        self.class_names = sidecar.get("class_names")
        self.label_to_category_id = sidecar.get("label_to_category_id")
        self.dynamic_batch = bool(sidecar["dynamic_batch"])
        self.batch = int(sidecar["batch"])
        self.batch_size = self.batch if batch_size is None else int(batch_size)
        if self.batch_size < 1 or (not self.dynamic_batch and self.batch_size > self.batch):
            raise ValueError(f"batch_size must be in 1..{self.batch} for this artifact, got {self.batch_size}")
        compiled = float(sidecar.get("score_thresh", 0.0))
        self.score_thresh = compiled if score_thresh is None else float(score_thresh)
        if self.score_thresh < compiled:
            raise ValueError(
                f"score_thresh={self.score_thresh}: below the artifact's compiled score_thresh {compiled}; "
                "export again with --score-thresh to lower it"
            )
        self.nms_thresh = sidecar.get("nms_thresh")
        self.detections_per_img = sidecar.get("detections_per_img")
        self._calls = {c: jax.jit(e.call) for c, e in self.exported.items()}

    def _call_batch(self, n: int) -> int:
        return n if self.dynamic_batch else self.batch

    def _forward(self, canvas, images, sizes):
        return self._calls[canvas](images, sizes)


def load(
    path,
    *,
    score_thresh: float | None = None,
    batch_size: int | None = None,
    score_threshold: float | None = None,
    mask_threshold: float | None = 0.5,
    mask_output: str = "image",
) -> ExportedDetector:
    """Reads the artifact(s) named by `path` and its sidecar `path.json` -> `ExportedDetector`.

    path: the `--out` FILE given to `python -m frcnn_jax.export` (with several canvases the
    per-canvas files beside it are read through the sidecar). score_thresh, batch_size,
    mask_threshold, mask_output: as `ExportedDetector`.
    """
    path = pathlib.Path(path)
    doc = read_sidecar(path)
    exported = {tuple(e["canvas"]): read_artifact(path.parent, e) for e in doc["artifacts"]}
    if score_threshold is not None:
        warnings.warn("score_threshold= is deprecated; use score_thresh=", DeprecationWarning, 2)
        score_thresh = score_threshold if score_thresh is None else score_thresh
    return ExportedDetector(
        doc, exported, score_thresh=score_thresh, batch_size=batch_size, mask_threshold=mask_threshold,
        mask_output=mask_output,
    )  # fmt: skip
