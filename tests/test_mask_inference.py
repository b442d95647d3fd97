"""Mask R-CNN through the user-facing paths on one tiny random R-18-FPN mask model: `Detector`'s
mask forms, `predict` (segmentation RLE + drawn fills), `eval.py --checkpoint` (bbox and segm),
training's detections grid, and the export artifact, its loader and the README's serve.py recipe.

Random-init mask logits sit near 0, so the pasted masks (`> 0.5`) are neither empty nor full
and every comparison below sees real masks. The pasting itself is tested against torchvision
in tests/test_host_masks.py; here every path must give exactly `host_masks`' result.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
import tiny_config  # noqa: E402

SIZES = dict(min_size=128, max_size=192)
CANVAS = (128, 192)
LIGHT_MASK = {"mask.enabled": True, "mask.conv_channels": (16, 16), "mask.predictor_channels": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny mask checkpoint (tiny_config's model + a light mask head), photos, and its Detector results."""
    from frcnn_jax import model_checkpoint
    from frcnn_jax.detector import Detector
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables

    cfg = ModelConfig.from_dict(tiny_config.get_config().model.to_dict()).updated(LIGHT_MASK)
    cfg = cfg.updated({"roi_heads.postprocess": {"score_thresh": 0.0, "detections_per_img": 20}})
    variables = init_variables(FasterRCNN(cfg), jax.random.key(0))
    names = ["__background__", "circle", "square", "triangle"][: cfg.num_classes]
    meta = {"class_names": names, **SIZES, "canvases": [list(CANVAS)]}
    ckpt = model_checkpoint.save_model(tmp_path_factory.mktemp("tiny_mask") / "ckpt", variables, cfg, meta)
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (100, 150, 3), np.uint8), rng.integers(0, 255, (84, 126, 3), np.uint8)]
    det = Detector.from_checkpoint(ckpt, mask_output="box")
    boxes_frame = det(photos)
    return {"ckpt": ckpt, "cfg": cfg, "variables": variables, "photos": photos, "det": det, "box": boxes_frame}


def test_detector_mask_forms(tiny):
    from pycocotools import mask as mask_utils

    from frcnn_jax import host_masks
    from frcnn_jax.detector import BatchedDetector, Detector

    det = tiny["det"]
    assert det.has_masks
    for photo, raw in zip(tiny["photos"], tiny["box"]):
        hw = photo.shape[:2]
        k = len(raw["scores"])
        assert k > 0 and raw["masks"].shape == (k, 28, 28) and raw["masks"].dtype == np.float32
        want = host_masks.paste_masks(raw["masks"], raw["boxes"], hw)
        # neither empty nor full (the boxes are small, ~12 px): the comparisons below see masks
        assert 0.05 < (raw["masks"] > 0.5).mean() < 0.95 and want.any(axis=(1, 2)).mean() > 0.5
        want_f = host_masks.paste_masks(raw["masks"], raw["boxes"], hw, threshold=None)
        # each form, through the shared post-process (the same compiled model)
        det.mask_output, det.mask_threshold = "image", 0.5
        img = det(photo)
        assert img["masks"].dtype == bool and img["masks"].shape == (k, *hw)
        assert np.array_equal(img["masks"], want) and np.array_equal(img["boxes"], raw["boxes"])
        det.mask_threshold = None
        assert np.array_equal(det(photo)["masks"], want_f) and want_f.dtype == np.float32
        det.mask_output, det.mask_threshold = "rle", 0.5
        rles = det(photo)["masks"]
        assert len(rles) == k and all(isinstance(r["counts"], str) and r["size"] == list(hw) for r in rles)
        assert np.array_equal(mask_utils.decode(rles).transpose(2, 0, 1).astype(bool), want)
        det.mask_output, det.mask_threshold = "box", 0.5
    for bad, match in [({"mask_output": "bitmap"}, "mask_output='bitmap': must be one of image, rle, box"),
                       ({"mask_threshold": 1.5}, r"mask_threshold=1.5: must be in \[0, 1\]"),
                       ({"mask_output": "rle", "mask_threshold": None}, "an RLE is binary")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            Detector(tiny["cfg"], tiny["variables"], **bad)

    class BoxOnly(BatchedDetector):  # a box-only model's output: results keep exactly their three keys
        min_size, max_size, canvases, batch_size, score_thresh = 128, 192, None, 1, 0.0

        def _forward(self, canvas, images, sizes):
            return {"boxes": np.array([[[1.0, 2.0, 30.0, 40.0]]], np.float32), "scores": np.array([[0.9]], np.float32),
                    "labels": np.array([[1]], np.int32), "valid": np.array([[True]])}  # fmt: skip

    assert set(BoxOnly()(tiny["photos"][0])) == {"boxes", "scores", "labels"}


def test_predict_writes_segmentations_and_draws_masks(tiny, tmp_path):
    from pycocotools import mask as mask_utils

    from frcnn_jax import host_masks
    from frcnn_jax.visualize import draw_detections

    photo = tiny["photos"][0]
    Image.fromarray(photo).save(tmp_path / "p.png")
    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.predict", "--checkpoint", str(tiny["ckpt"]), str(tmp_path / "p.png"),
         "--out", str(tmp_path / "out"), "--score-thresh", "0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    records = json.loads((tmp_path / "out" / "p.json").read_text())
    raw = tiny["box"][0]
    order = np.argsort(-raw["scores"], kind="stable")
    assert len(records) == len(order) > 0
    want = host_masks.paste_masks(raw["masks"], raw["boxes"], photo.shape[:2])
    for rec, k in zip(records, order):
        seg = rec["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == list(photo.shape[:2])
        assert np.array_equal(mask_utils.decode(seg).astype(bool), want[k])
        assert rec["box"] == [float(v) for v in raw["boxes"][k]]
    png = np.asarray(Image.open(tmp_path / "out" / "p.png").convert("RGB"))
    boxes_only = np.asarray(draw_detections(photo, raw["boxes"], raw["scores"], raw["labels"], tiny["det"].class_names))
    with_masks = np.asarray(
        draw_detections(photo, raw["boxes"], raw["scores"], raw["labels"], tiny["det"].class_names, masks=want)
    )
    assert np.array_equal(png, with_masks) and not np.array_equal(png, boxes_only)


def test_eval_checkpoint_evaluates_bbox_and_segm(tiny, tmp_path):
    from pycocotools import mask as mask_utils

    from frcnn_jax.data import builder
    from frcnn_jax.detector import Detector
    from frcnn_jax.evaluation import STAT_KEYS

    out = tmp_path / "eval"
    r = subprocess.run(
        [sys.executable, "eval.py", "--config=tests/tiny_config.py", f"--checkpoint={tiny['ckpt']}", f"--out={out}",
         "--max_images=2", "--score_thresh=0.0"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(STAT_KEYS) <= set(metrics) and set(STAT_KEYS) <= set(metrics["segm"])
    assert "mask AP" in r.stdout and "segm (instance masks):" in r.stdout
    dets = json.loads((out / "detections.json").read_text())
    assert dets and all("segmentation" in d and "bbox" in d for d in dets)
    # the evaluated masks are Detector's (same program shape: the evaluation's batch and canvas)
    config = tiny_config.get_config()
    with config.unlocked():
        config.data.masks = True
    source = builder.build_source(config.data, "val")
    det = Detector(tiny["cfg"], tiny["variables"], min_size=config.data.test_min_size, max_size=config.data.max_size,
                   canvases=config.data.canvases, batch_size=config.data.eval_batch_size, mask_output="rle")  # fmt: skip
    res = det(source[0]["image"])
    image_id = source[0]["image_id"]
    got = [d["segmentation"] for d in dets if d["image_id"] == image_id]
    keep = res["labels"] > 0
    assert len(got) == int(keep.sum()) > 0
    for g, w in zip(got, [m for m, k in zip(res["masks"], keep) if k]):
        assert np.array_equal(mask_utils.decode(g), mask_utils.decode(w))


def test_training_detections_grid_draws_masks(tiny, tmp_path):
    from frcnn_jax.data import builder
    from frcnn_jax.evaluation.model_eval import predictions_png

    config = tiny_config.get_config()
    source = builder.build_source(config.data, "val")
    path = predictions_png(tiny["cfg"], tiny["variables"], source, config, tmp_path / "d.png", None, count=1,
                           score_thresh=0.0)  # fmt: skip
    assert path is not None and Image.open(path).size[0] >= 128


def test_export_masks_equal_detector_and_recipe(tiny, tmp_path):
    from pycocotools import mask as mask_utils

    from frcnn_jax import export as fexport
    from frcnn_jax.export import __main__ as cli
    from test_export import run_recipe

    out = tmp_path / "serve" / "mask.jaxexport"
    argv = ["--checkpoint", str(tiny["ckpt"]), "--out", str(out), "--canvas", "128x192", "--batch", "2",
            "--platforms", "cpu", "--score-thresh", "0.0"]  # fmt: skip
    assert cli.main(argv) == 0
    doc = fexport.read_sidecar(out)
    names = [o["name"] for o in doc["artifacts"][0]["outputs"]]
    assert names == ["boxes", "labels", "masks", "scores", "valid"]
    assert doc["artifacts"][0]["outputs"][2] == {"name": "masks", "shape": [2, 20, 28, 28], "dtype": "float32"}
    assert doc["masks"]["resolution"] == 28 and "paste_masks_in_image" in doc["mask_postprocessing"]
    loaded = fexport.load(out)
    det = tiny["det"]
    det.mask_output = "image"
    try:
        want = det(tiny["photos"])
    finally:
        det.mask_output = "box"
    got = loaded(tiny["photos"])
    for g, w in zip(got, want):
        assert np.array_equal(g["boxes"], w["boxes"]) and np.array_equal(g["scores"], w["scores"])
        assert g["masks"].dtype == bool and np.array_equal(g["masks"], w["masks"])  # bitwise

    paths = []
    for i, photo in enumerate(tiny["photos"]):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(photo).save(paths[-1])
    lines = run_recipe(out, paths, tmp_path)
    assert len(lines) == 2
    for line, w in zip(lines, want):
        dets = line["detections"]
        assert len(dets) == len(w["scores"]) > 0
        assert np.array_equal(np.array([d["box"] for d in dets], np.float32), w["boxes"])
        for d, m in zip(dets, w["masks"]):
            assert np.array_equal(mask_utils.decode(d["segmentation"]).astype(bool), m)
