"""Building a serving artifact: the detector's forward with its weights baked in, lowered
by `jax.export` for several platforms, plus the JSON sidecar that says how to feed it.

    exported = export_forward(cfg, variables, canvas=(800, 1344), batch=1)
    write_artifacts("model.jaxexport", {(800, 1344): exported}, sidecar_doc)

The exported function is `forward(images, image_sizes) -> {"boxes", "labels", "scores",
"valid"}` (see `forward_fn`); its weights are closed-over constants behind one
`lax.optimization_barrier`, so XLA does not constant-fold them (folding the frozen
batch-norm arithmetic on the host rounds differently from the compiled kernels, and the
artifact's detections then differ from `Detector`'s in the last bits).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.data import transforms
from frcnn_jax.io_utils import write_atomic
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN

SIDECAR_FORMAT = "frcnn_jax.export/1"
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
DTYPES = ("float32", "bfloat16")
INPUT_NAMES = ("images", "image_sizes")
OUTPUT_NAMES = ("boxes", "labels", "scores", "valid")  # the output dict's keys, in its flattening order
MASK_OUTPUT_NAMES = ("boxes", "labels", "masks", "scores", "valid")  # a Mask R-CNN model's (sorted keys)


def output_names(model_config: ModelConfig) -> tuple[str, ...]:
    """The serving outputs' names in their flattening order: OUTPUT_NAMES, plus "masks" for Mask R-CNN."""
    return MASK_OUTPUT_NAMES if model_config.mask.enabled else OUTPUT_NAMES


def parse_canvas(text: str) -> tuple[int, int]:
    """ "800x1344" -> (800, 1344); ValueError unless H x W positive multiples of 32."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--canvas {text!r}: expected HxW, e.g. 800x1344")
    try:
        return transforms.check_canvases([(int(m.group(1)), int(m.group(2)))])[0]
    except ValueError as e:
        raise ValueError(f"--canvas {text}: {e}") from None


def parse_platforms(text: str) -> tuple[str, ...]:
    """ "cpu,cuda,tpu" -> ("cpu", "cuda", "tpu"); ValueError naming an unknown platform."""
    names = tuple(p.strip().lower() for p in str(text).split(",") if p.strip())
    if not names:
        raise ValueError("--platforms names no platform; choose from " + ",".join(PLATFORMS))
    for p in names:
        if p not in PLATFORMS:
            hint = " (use cuda or rocm)" if p == "gpu" else ""
            raise ValueError(f"--platforms: unknown platform {p!r}{hint}; choose from {','.join(PLATFORMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--platforms {text}: a platform is named twice")
    return names


def serving_variables(variables: dict, dtype: str) -> dict:
    """The variables to bake in: numpy arrays; for bfloat16 the trained `params` cast to bfloat16.

    Every parameter is cast to the compute dtype where the model uses it, so casting once
    here is exact and halves the artifact; the frozen batch-norm statistics stay float32
    (the model derives its scale and shift from them in float32).
    """
    out = {k: jax.tree.map(np.asarray, v) for k, v in variables.items()}
    if dtype == "bfloat16":
        to_bf16 = lambda a: a.astype(jnp.bfloat16) if np.issubdtype(a.dtype, np.floating) else a  # noqa: E731
        out["params"] = jax.tree.map(to_bf16, out["params"])
    return out


def forward_fn(model_config: ModelConfig, variables: dict):
    """The serving function `forward(images, image_sizes) -> dict` with `variables` baked in.

    Args of the returned function:
      images: float32 [B, H, W, 3] normalised images, zero-padded to the canvas.
      image_sizes: int32 [B, 2] (h, w) of each resized image inside the canvas.
    Returns (of the returned function):
      {"boxes": float32 [B, D, 4] (x1, y1, x2, y2) in resized-image (canvas) pixels,
       "scores": float32 [B, D], "labels": int32 [B, D], "valid": bool [B, D]};
      D = model_config.roi_heads.postprocess.detections_per_img, valid entries first by decreasing score.
      A Mask R-CNN model (`model_config.mask.enabled`) adds "masks": float32 [B, D, M, M],
      each detection's mask probabilities in its box's frame (M = 28 FPN, 14 C4; 0 for
      invalid rows), to be pasted on the host (`host_masks`, the sidecar's
      "mask_postprocessing").
    """
    model = FasterRCNN(model_config)

    def forward(images, image_sizes):
        baked = jax.lax.optimization_barrier(variables)
        out = model.apply(baked, images, image_sizes)
        result = {
            "boxes": out["boxes"].astype(jnp.float32),
            "labels": out["labels"].astype(jnp.int32),
            "scores": out["scores"].astype(jnp.float32),
            "valid": out["valid"].astype(bool),
        }
        if "masks" in out:
            result["masks"] = out["masks"].astype(jnp.float32)
        return result

    return forward


def export_forward(
    model_config: ModelConfig,
    variables: dict,
    canvas: tuple[int, int],
    batch: int,
    *,
    platforms: Sequence[str] = ("cpu", "cuda", "tpu"),
    dynamic_batch: bool = False,
    dtype: str = "float32",
) -> jax.export.Exported:
    """Lowers the serving forward for one canvas and batch -> `jax.export.Exported`.

    canvas: (H, W), multiples of 32. batch: images per call (ignored with
    dynamic_batch, which makes the batch dimension the symbolic size "b").
    dtype: the compute dtype ("float32" or "bfloat16"); inputs and outputs stay as in
    `forward_fn` whatever the dtype.
    """
    # The loader compiles the artifact without compile options: XLA:CPU's default kernels.
    cfg = model_config.replace(dtype=dtype, cpu_kernels="default")
    fn = jax.jit(forward_fn(cfg, serving_variables(variables, dtype)))
    b = jax.export.symbolic_shape("b")[0] if dynamic_batch else int(batch)
    h, w = canvas
    specs = (jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((b, 2), jnp.int32))
    return jax.export.export(fn, platforms=tuple(platforms))(*specs)


def _spec(aval, name: str) -> dict:
    return {"name": name, "shape": [d if isinstance(d, int) else str(d) for d in aval.shape], "dtype": str(aval.dtype)}


def artifact_signature(exported: jax.export.Exported) -> dict:
    """{"inputs": [...], "outputs": [...]}: name, shape (a symbolic dim as its name) and dtype of each."""
    names = MASK_OUTPUT_NAMES if len(exported.out_avals) == len(MASK_OUTPUT_NAMES) else OUTPUT_NAMES
    return {
        "inputs": [_spec(a, n) for a, n in zip(exported.in_avals, INPUT_NAMES)],
        "outputs": [_spec(a, n) for a, n in zip(exported.out_avals, names)],
    }


def artifact_paths(out, canvases: Sequence[tuple[int, int]]) -> list[pathlib.Path]:
    """One file per canvas: `out` itself for a single canvas, else `<stem>-HxW<suffix>` beside it."""
    out = pathlib.Path(out)
    if len(canvases) == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{h}x{w}{out.suffix}") for h, w in canvases]


def sidecar_path(out) -> pathlib.Path:
    out = pathlib.Path(out)
    return out.with_name(out.name + ".json")


def sidecar_document(
    model_config: ModelConfig,
    metadata: dict,
    *,
    canvases: Sequence[tuple[int, int]],
    batch: int,
    dynamic_batch: bool,
    platforms: Sequence[str],
    dtype: str,
    min_size: int,
    max_size: int,
) -> dict[str, Any]:
    """The preprocessing contract and model facts (artifact entries are added by `write_artifacts`)."""
    names = metadata.get("class_names")
    return {
        "format": SIDECAR_FORMAT,
        "call": "jax.export.deserialize(bytes).call(images, image_sizes) -> dict of outputs",
        "batch": int(batch),
        "dynamic_batch": bool(dynamic_batch),
        "platforms": list(platforms),
        "dtype": dtype,
        "canvases": [list(c) for c in canvases],
        "preprocessing": {
            "color": "RGB",
            "scale": "pixel / 255",
            "mean": list(transforms.IMAGE_MEAN),
            "std": list(transforms.IMAGE_STD),
            "min_size": int(min_size),
            "max_size": int(max_size),
            "resize": "scale = min(min_size / min(h, w), max_size / max(h, w)); size = floor(h * scale), "
            "floor(w * scale); bilinear, align_corners=False, no antialias (torch F.interpolate)",
            "canvas": "the smallest-area canvas (H, W) holding the resized image (first on ties); "
            "normalised image at the top-left, zeros elsewhere",
            "normalize": "(pixel / 255 - mean) / std, float32",
            "padding_batch_entries": "static batch: unused entries are zero images with image_sizes (32, 32)",
        },
        "postprocessing": "keep valid; boxes (resized-image pixels) * (orig_w / w, orig_h / h, orig_w / w, orig_h / h)",
        **(_mask_contract(model_config) if model_config.mask.enabled else {}),
        "class_names": list(names) if names is not None else None,
        "label_to_category_id": metadata.get("label_to_category_id"),
        "score_thresh": model_config.roi_heads.postprocess.score_thresh,
        "nms_thresh": model_config.roi_heads.postprocess.nms_thresh,
        "detections_per_img": model_config.roi_heads.postprocess.detections_per_img,
        "model": model_config.replace(dtype=dtype, cpu_kernels="default").to_dict(),
        "source": metadata.get("source"),
        "jax_version": jax.__version__,
    }


def _mask_contract(model_config: ModelConfig) -> dict[str, Any]:
    """The sidecar's mask entries of a Mask R-CNN model: output name, resolution M, paste arithmetic."""
    from frcnn_jax.modeling.architectures import architecture

    return {
        "masks": {"output": "masks", "shape": ["B", "D", "M", "M"], "dtype": "float32",
                  "resolution": int(architecture(model_config).mask_resolution)},
        "mask_postprocessing": "per valid detection, with its box in original pixels (postprocessing): torchvision's "
        "paste_masks_in_image: pad the M x M mask by 1 (zeros); scale the box about its centre by (M + 2) / M "
        "(float32); truncate to integers (x1, y1, x2, y2); resize the padded mask to (y2 - y1 + 1, x2 - x1 + 1) "
        "(at least 1) bilinearly, align_corners=False (float32); place it at (x1, y1) clipped to the image; "
        "foreground = probability > 0.5",
    }  # fmt: skip


def write_artifacts(out, exported: dict[tuple[int, int], jax.export.Exported], document: dict) -> pathlib.Path:
    """Writes each canvas's serialized artifact and then the sidecar `out.json`; returns the sidecar path.

    exported: canvas (H, W) -> Exported, in the order of `document["canvases"]`.
    """
    canvases = [tuple(c) for c in document["canvases"]]
    paths = artifact_paths(out, canvases)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for canvas, path in zip(canvases, paths):
        exp = exported[canvas]
        blob = bytes(exp.serialize())
        write_atomic(path, blob)
        entries.append(
            {
                "canvas": list(canvas),
                "file": path.name,
                "bytes": len(blob),
                "sha256": hashlib.sha256(blob).hexdigest(),
                "calling_convention_version": exp.calling_convention_version,
                **artifact_signature(exp),
            }
        )
    side = sidecar_path(out)
    write_atomic(side, json.dumps({**document, "artifacts": entries}, indent=1))
    return side
