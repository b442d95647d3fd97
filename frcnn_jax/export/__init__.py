"""Serving export: a self-contained StableHLO artifact of a detector (`jax.export`).

    python -m frcnn_jax.export --checkpoint CKPT --out model.jaxexport --canvas 800x1344 --batch 1 \
        [--platforms cpu,cuda,tpu] [--dtype float32|bfloat16] [--dynamic-batch]

    from frcnn_jax import export
    det = export.load("model.jaxexport")       # Detector's interface, no model code
    det([image])[0]["boxes"]

The artifact FILE holds `jax.export.Exported.serialize()` of the forward pass with the
weights baked in: `call(images float32 [B, H, W, 3], image_sizes int32 [B, 2]) ->
{"boxes" float32 [B, D, 4], "labels" int32 [B, D], "scores" float32 [B, D], "valid"
bool [B, D]}` (boxes in resized-image pixels); a Mask R-CNN model adds "masks" float32
[B, D, M, M] (box-frame probabilities, pasted by the loader with `Detector`'s arithmetic). `FILE.json` (the sidecar) is the
preprocessing contract. With several `--canvas` flags each canvas gets its own artifact,
`<stem>-HxW<suffix>` beside FILE, all listed in the one sidecar `FILE.json`.
The README ("Export and serving") has a recipe that runs an artifact without importing frcnn_jax.

Modules: `artifact` (lowering, sidecar, writing), `loader` (`load`), `__main__` (CLI).
"""

from frcnn_jax.export.artifact import (
    DTYPES,
    PLATFORMS,
    SIDECAR_FORMAT,
    artifact_paths,
    export_forward,
    forward_fn,
    parse_canvas,
    parse_platforms,
    sidecar_document,
    sidecar_path,
    write_artifacts,
)
from frcnn_jax.export.loader import ExportedDetector, load, read_sidecar

__all__ = [
    "DTYPES", "PLATFORMS", "SIDECAR_FORMAT", "ExportedDetector", "artifact_paths", "export_forward", "forward_fn",
    "load", "parse_canvas", "parse_platforms", "read_sidecar", "sidecar_document", "sidecar_path", "write_artifacts",
]  # fmt: skip
