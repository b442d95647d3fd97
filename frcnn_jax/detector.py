"""The high-level inference API: images in, boxes / labels / scores out.

    from frcnn_jax.detector import Detector
    det = Detector.from_checkpoint("checkpoints/fasterrcnn_r50_fpn")
    results = det([image_a, image_b])          # uint8 [H, W, 3] RGB arrays
    results[0]["boxes"], results[0]["scores"], results[0]["labels"]

Preprocessing is torchvision's `GeneralizedRCNNTransform` (RGB / 255, ImageNet mean and
std, short side `min_size`, long side at most `max_size`), done on the host; each
resized image is zero-padded into a static canvas, the model runs jitted (one compile
per canvas shape and batch size) and boxes come back in original image pixels.

Post-processing: `score_thresh`, `nms_thresh` and `detections_per_img` (torchvision's
`box_score_thresh` / `box_nms_thresh` / `box_detections_per_img`) replace the model
config's `roi_heads.postprocess` values in the COMPILED post-process, so a threshold
below the trained default (0.05) keeps more boxes; None keeps the model's value.

Masks (Mask R-CNN models, `ModelConfig.mask.enabled`): each result also carries the
detections' instance masks, pasted into the ORIGINAL image with torchvision's
`paste_masks_in_image` arithmetic (`frcnn_jax.host_masks`: each mask touches only its
box's region of the image). `mask_output` chooses their form:

  "image" (default): `masks` [K, H, W] bool, `probability > mask_threshold` (default
      0.5; `mask_threshold=None` gives float32 probabilities instead);
  "rle": `masks` a list of K COCO compressed RLE dicts {"size": [H, W], "counts": str}
      of the thresholded masks, encoded one at a time: no [K, H, W] array is ever held
      (100 masks of a 3000x2000 photo are 600 MB even as bool);
  "box": `masks` [K, M, M] float32, the model's probabilities in each box's frame (M =
      28 FPN, 14 C4), unpasted: paste lazily with `host_masks.iter_pasted_masks` /
      `iter_mask_rles(masks, boxes, image_hw)`.

Box-only models' results have no `masks` key and are exactly as before.

Canvases: by default each image is padded to the next multiple of 32 (torchvision's
`size_divisible`), which reproduces torchvision's single-image results exactly and
compiles once per distinct padded shape. Pass `canvases=[(H, W), ...]` (multiples of
32) to bound the number of compiled shapes; each image then uses the smallest canvas
that holds it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax import host_masks
from frcnn_jax import model_checkpoint as ckpt
from frcnn_jax.data import transforms
from frcnn_jax.modeling import cpu_kernels as cpu_kernels_lib
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN


def as_rgb_uint8(image, index: int = 0) -> np.ndarray:
    """PIL image or array [H, W], [H, W, 1|3|4] (uint8, or float in [0, 1]) -> uint8 [H, W, 3]."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images[{index}] must be [H, W, 3] RGB (or [H, W], [H, W, 1|4]), got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"images[{index}] is empty: shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ValueError(f"images[{index}]: float images must be finite and in [0, 1]")
        return np.round(arr * 255).astype(np.uint8)
    raise ValueError(f"images[{index}] has dtype {arr.dtype}; expected uint8 or float in [0, 1]")


def padded_canvas(h: int, w: int, divisible: int = 32) -> tuple[int, int]:
    return (math.ceil(h / divisible) * divisible, math.ceil(w / divisible) * divisible)


MASK_OUTPUTS = ("image", "rle", "box")


def check_mask_options(mask_output: str, mask_threshold: float | None) -> tuple[str, float | None]:
    """Validated (mask_output, mask_threshold); ValueError naming the bad value."""
    if mask_output not in MASK_OUTPUTS:
        raise ValueError(f"mask_output={mask_output!r}: must be one of {', '.join(MASK_OUTPUTS)}")
    if mask_threshold is not None:
        if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, (int, float, np.floating)):
            raise ValueError(f"mask_threshold={mask_threshold!r}: must be a number in [0, 1] or None")
        if not 0.0 <= float(mask_threshold) <= 1.0:
            raise ValueError(f"mask_threshold={mask_threshold!r}: must be in [0, 1]")
        mask_threshold = float(mask_threshold)
    elif mask_output == "rle":
        raise ValueError("mask_threshold=None: an RLE is binary, mask_output='rle' needs a threshold")
    return mask_output, mask_threshold


def result_masks(masks, boxes, image_hw, mask_output: str = "image", mask_threshold: float | None = 0.5):
    """One image's kept mask probabilities -> the `masks` entry of its result (see the module doc).

    Args:
      masks: [K, M, M] float32 probabilities in each box's frame (the model's `masks` row).
      boxes: [K, 4] float32 (x1, y1, x2, y2) in original image pixels.
      image_hw: (H, W) of the original image.
      mask_output: "image" -> [K, H, W] bool (float32 when mask_threshold is None);
        "rle" -> list of K COCO RLE dicts; "box" -> masks as float32 [K, M, M].
    """
    masks = np.asarray(masks, np.float32)
    if mask_output == "box":
        return masks
    if mask_output == "rle":
        return list(host_masks.iter_mask_rles(masks, boxes, image_hw, mask_threshold))
    return host_masks.paste_masks(masks, boxes, image_hw, mask_threshold)


def with_postprocess(
    model_config: ModelConfig,
    *,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
    detections_per_img: int | None = None,
) -> ModelConfig:
    """`model_config` with the given `roi_heads.postprocess` fields replaced (None: kept).

    Raises ValueError naming the field ("score_thresh=1.5: must be in [0, 1]",
    "detections_per_img=0: must be a positive integer").
    """
    changes = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
    changes = {k: v for k, v in changes.items() if v is not None}
    for name in ("score_thresh", "nms_thresh"):
        if name in changes and not (isinstance(changes[name], (int, float)) and 0.0 <= changes[name] <= 1.0):
            raise ValueError(f"{name}={changes[name]!r}: must be in [0, 1]")
    if "detections_per_img" in changes:
        v = changes["detections_per_img"]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"detections_per_img={v!r}: must be a positive integer")
        changes["detections_per_img"] = int(v)
    if not changes:
        return model_config
    return model_config.updated({f"roi_heads.postprocess.{k}": v for k, v in changes.items()})


class BatchedDetector:
    """Host side of inference, shared by `Detector` and `frcnn_jax.export`'s loader.

    Preprocessing (resize, normalise, canvas choice), batching into padded static-shape
    calls, and rescaling the boxes back to original pixels. A subclass supplies
    `_forward(canvas, images, sizes)` (float32 [B, H, W, 3], int32 [B, 2] -> the model's
    output dict, host or device arrays) and sets the attributes named below.

    Attributes a subclass sets: min_size, max_size (resize rule), canvases (None: pad to
    multiples of 32, or a list of (H, W)), batch_size (images per call), score_thresh
    (detections scoring at most this are dropped on the host; a no-op when it equals
    the compiled post-process's threshold). `_call_batch(n)`: the batch dimension of a call holding n images
    (default `batch_size`: partial batches are padded with (32, 32) zero images).
    mask_output, mask_threshold (class defaults "image", 0.5): the form of `masks` when
    the output has them (see the module doc and `result_masks`).
    """

    min_size: int
    max_size: int
    canvases: list[tuple[int, int]] | None
    batch_size: int
    score_thresh: float
    mask_output: str = "image"
    mask_threshold: float | None = 0.5

    def _forward(self, canvas: tuple[int, int], images: np.ndarray, sizes: np.ndarray) -> dict:
        raise NotImplementedError

    def _call_batch(self, n: int) -> int:
        return self.batch_size

    # --- preprocessing ------------------------------------------------------------------
    def canvas_for(self, h: int, w: int) -> tuple[int, int]:
        if self.canvases is None:
            return padded_canvas(h, w)
        return tuple(transforms.choose_canvas(h, w, self.canvases))

    def preprocess(self, image: np.ndarray):
        """uint8 [H, W, 3] -> (normalised float32 [h, w, 3] resized image, (h, w))."""
        resized, size = transforms.resize_image(image, self.min_size, self.max_size)
        return transforms.normalize(resized), size

    # --- inference -----------------------------------------------------------------------
    def __call__(self, images) -> list[dict[str, np.ndarray]]:
        """Detections for each image.

        Args:
          images: one image or a list: uint8 [H, W, 3] RGB arrays (or PIL images,
            grayscale, or float arrays in [0, 1]).
        Returns:
          list of dicts (one per image, or a single dict for a single image):
          boxes [K, 4] float32 (x1, y1, x2, y2) in original image pixels, scores [K]
          float32, labels [K] int32 (model class index), sorted by decreasing score,
          valid detections only. Mask models add `masks`: [K, H, W] bool at the
          original size (H, W), or the form `mask_output` names (module doc).
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        prepared = []
        for i, img in enumerate(batch):
            rgb = as_rgb_uint8(img, i)
            norm, size = self.preprocess(rgb)
            prepared.append((norm, size, rgb.shape[:2]))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, size, _) in enumerate(prepared):
            groups.setdefault(self.canvas_for(*size), []).append(i)
        results: list[dict | None] = [None] * len(batch)
        for canvas, idxs in groups.items():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                for i, det in zip(chunk, self._run(canvas, [prepared[i] for i in chunk])):
                    results[i] = det
        return results[0] if single else results

    def check_canvases_cover(self) -> None:
        """Raises ValueError when some image could resize to a shape no canvas holds (see
        `transforms.check_canvases_cover`); a no-op without canvases (pad to multiples of 32)."""
        if self.canvases is not None:
            transforms.check_canvases_cover(self.canvases, self.min_size, self.max_size)

    def _run(self, canvas, items):
        b = self._call_batch(len(items))
        images = np.zeros((b, *canvas, 3), np.float32)
        sizes = np.ones((b, 2), np.int32) * 32
        for k, (norm, size, _) in enumerate(items):
            images[k] = transforms.pad_to_canvas(norm, canvas)
            sizes[k] = size
        out = jax.device_get(self._forward(canvas, images, sizes))
        return [self._result(out, k, size, orig) for k, (_, size, orig) in enumerate(items)]

    def _result(self, out: dict, k: int, size: tuple[int, int], orig: tuple[int, int]) -> dict[str, np.ndarray]:
        """Entry k of a batched model output -> one image's detections in original pixels.

        out: host arrays boxes [B, D, 4] (resized-image pixels), scores [B, D], labels
        [B, D], valid [B, D]. size: (h, w) of the resized image; orig: (H, W) of the
        original. Returns {"boxes" [K, 4] float32, "scores" [K] float32, "labels" [K]
        int32}: the valid detections scoring above `score_thresh`, in the model's order;
        with `masks` [B, D, M, M] in `out` also "masks" (`result_masks`, pasted at (H, W)).
        """
        keep = out["valid"][k] & (out["scores"][k] > self.score_thresh)
        det = {
            "boxes": transforms.resize_boxes(out["boxes"][k][keep], size, orig),  # back to original pixels
            "scores": out["scores"][k][keep].astype(np.float32),
            "labels": out["labels"][k][keep].astype(np.int32),
        }
        if "masks" in out:
            det["masks"] = result_masks(
                out["masks"][k][keep], det["boxes"], orig, self.mask_output, self.mask_threshold
            )
        return det


class Detector(BatchedDetector):
    """A Faster R-CNN (or Mask R-CNN) model ready for inference on lists of images.

    Args:
      model_config: the architecture. variables: {"params", "frozen"}.
      class_names: index = label (0 = background); used by `predict` for drawing.
      min_size, max_size: resize rule (short side, cap on the long side).
      canvases: None (pad to multiples of 32) or a list of (H, W) canvas shapes.
      batch_size: images per compiled call (a partial batch is padded).
      score_thresh, nms_thresh, detections_per_img: the post-process of this detector
        (None: the model config's `roi_heads.postprocess` value). They are compiled into
        the model (detections need score > score_thresh; per-class NMS at IoU
        nms_thresh; at most detections_per_img per image), so a score_thresh below the
        trained default keeps boxes the default drops. `score_threshold` is a
        deprecated alias of score_thresh.
      mask_threshold, mask_output: for Mask R-CNN models, the form of each result's
        `masks` (module doc): "image" [K, H, W] bool (`> mask_threshold`; None: float32
        probabilities), "rle" (COCO RLEs, one mask at a time) or "box" ([K, M, M]
        unpasted). Ignored for box-only models.
      cpu_kernels: XLA:CPU's kernels for the compiled model, "default" or "ynnpack_dots"
        (`ModelConfig.cpu_kernels`; None: the model config's). Same detections up to float
        rounding; on the development CPU "ynnpack_dots" shortens the training step by a
        third but not inference (README, Benchmarks).

    Attributes: model_config (with the post-process above), score_thresh, nms_thresh,
    detections_per_img (the values in effect), min_size, max_size, canvases, batch_size,
    class_names, label_to_category_id, has_masks, mask_output, mask_threshold.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        variables,
        *,
        class_names: Sequence[str] | None = None,
        label_to_category_id: dict | None = None,
        min_size: int = 800,
        max_size: int = 1333,
        canvases: Sequence[tuple[int, int]] | None = None,
        batch_size: int = 1,
        score_thresh: float | None = None,
        nms_thresh: float | None = None,
        detections_per_img: int | None = None,
        score_threshold: float | None = None,
        mask_threshold: float | None = 0.5,
        mask_output: str = "image",
        cpu_kernels: str | None = None,
    ):
        self.mask_output, self.mask_threshold = check_mask_options(mask_output, mask_threshold)
        if score_threshold is not None:
            warnings.warn("Detector(score_threshold=) is deprecated; use score_thresh=", DeprecationWarning, 2)
            if score_thresh is None:
                score_thresh = score_threshold
        model_config = with_postprocess(
            model_config, score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img
        )
        if cpu_kernels is not None:
            model_config = model_config.replace(cpu_kernels=cpu_kernels)  # validated: one line naming the value
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if canvases is not None:
            for c in canvases:
                if len(c) != 2 or c[0] % 32 or c[1] % 32:
                    raise ValueError(f"canvases must be (H, W) pairs of multiples of 32, got {c!r}")
        self.model_config = model_config
        self.model = FasterRCNN(model_config)
        self.has_masks = bool(model_config.mask.enabled)
        self.variables = jax.tree.map(jnp.asarray, variables)
        self.class_names = list(class_names) if class_names is not None else None
        self.label_to_category_id = label_to_category_id
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.canvases = [tuple(int(v) for v in c) for c in canvases] if canvases is not None else None
        self.batch_size = int(batch_size)
        post = model_config.roi_heads.postprocess
        self.score_thresh, self.nms_thresh = float(post.score_thresh), float(post.nms_thresh)
        self.detections_per_img = int(post.detections_per_img)
        self._apply = jax.jit(
            lambda v, images, sizes: self.model.apply(v, images, sizes),
            compiler_options=cpu_kernels_lib.compiler_options(model_config.cpu_kernels) or None,
        )

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> Detector:
        """A model checkpoint (from `frcnn_jax.convert`) or a training work directory."""
        cfg, variables, meta = ckpt.load_model(path)
        if cfg is None:
            raise ValueError(f"{path} holds a backbone only ({meta.get('kind')}), not a detector")
        kwargs.setdefault("class_names", meta.get("class_names"))
        kwargs.setdefault("label_to_category_id", meta.get("label_to_category_id"))
        for key in ("min_size", "max_size", "canvases"):
            if key in meta and key not in kwargs:
                kwargs[key] = meta[key]
        return cls(cfg, variables, **kwargs)

    def _forward(self, canvas, images, sizes):
        return self._apply(self.variables, images, sizes)
