"""Inference settings per call (Detector, eval.py, export loader) and predict on folders of photos.

One tiny random R-18-FPN checkpoint with 31 classes is shared: its softmax scores sit
near 1/31 (below the trained default score_thresh 0.05), so the default keeps few boxes
and score_thresh=0.0 keeps many: a lower threshold can only show by changing the
compiled post-process.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, str(REPO / "tests"))
import tiny_config  # noqa: E402

NUM_CLASSES = 31
SIZES = dict(min_size=128, max_size=192)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from frcnn_jax import model_checkpoint
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables

    small = {  # few proposals: post-processing 50 x 30 candidates stays cheap
        "num_classes": NUM_CLASSES, "rpn.test": {"pre_nms_top_n": 200, "post_nms_top_n": 50},
        "roi_heads.postprocess.detections_per_img": 40,
    }  # fmt: skip
    cfg = ModelConfig.from_dict(tiny_config.get_config().model.to_dict()).updated(small)
    variables = init_variables(FasterRCNN(cfg), jax.random.key(0))
    meta = {
        "class_names": ["__background__"] + [f"c{i}" for i in range(1, NUM_CLASSES)],
        "label_to_category_id": {str(i): i for i in range(1, NUM_CLASSES)},
        **SIZES,
    }
    ckpt = model_checkpoint.save_model(tmp_path_factory.mktemp("tiny") / "ckpt", variables, cfg, meta)
    rng = np.random.default_rng(0)
    photos = {  # (h, w): landscape, portrait, square; resized to (128, 192), (192, 128), (128, 128)
        "land": rng.integers(0, 255, (100, 150, 3), np.uint8),
        "port": rng.integers(0, 255, (150, 100, 3), np.uint8),
        "square": rng.integers(0, 255, (64, 64, 3), np.uint8),
    }
    return {"ckpt": ckpt, "cfg": cfg, "variables": variables, "photos": photos}


def _same_class_overlaps(det) -> int:
    """Pairs of detections of one label whose boxes overlap (IoU > 0)."""
    from frcnn_jax.host_boxes import iou_one_to_many

    iou = np.stack([iou_one_to_many(b, det["boxes"]) for b in det["boxes"]]).reshape(len(det["boxes"]), -1)
    same = det["labels"][:, None] == det["labels"][None, :]
    return int(np.triu((iou > 0) & same, k=1).sum())


# Every in-process detector below runs 2 images on the canvas (128, 192) (and predict also on
# (192, 128)) at batch 2: equal settings compile equal programs, which JAX's persistent
# cache (tests/conftest.py) compiles once.
CANVASES = [(128, 192), (192, 128)]


def test_detector_post_process_is_compiled_per_call(tiny):
    from frcnn_jax.detector import Detector, with_postprocess

    images = [tiny["photos"]["land"], tiny["photos"]["square"]]  # both in the canvas (128, 192)
    kw = dict(canvases=CANVASES, batch_size=2)
    default = Detector.from_checkpoint(tiny["ckpt"], **kw)
    assert (default.score_thresh, default.nms_thresh, default.detections_per_img) == (0.05, 0.5, 40)
    low = Detector.from_checkpoint(tiny["ckpt"], score_thresh=0.0, **kw)
    assert low.model_config.roi_heads.postprocess.score_thresh == 0.0
    n_default = [len(r["scores"]) for r in default(images)]
    lows = low(images)
    n_low = [len(r["scores"]) for r in lows]
    assert all(a < b for a, b in zip(n_default, n_low)), (n_default, n_low)
    assert max(r["scores"].max() for r in lows) < 0.1  # random weights: the scores are low
    strict = Detector.from_checkpoint(tiny["ckpt"], score_thresh=0.0, nms_thresh=0.0, **kw)
    for r, full in zip(strict(images), lows):  # IoU 0: no two boxes of one class may overlap
        assert _same_class_overlaps(r) == 0 < _same_class_overlaps(full) and len(r["scores"]) > 0
    with pytest.warns(DeprecationWarning):
        old = Detector.from_checkpoint(tiny["ckpt"], score_threshold=0.0)
    assert old.score_thresh == 0.0
    assert Detector.from_checkpoint(tiny["ckpt"], detections_per_img=3).detections_per_img == 3
    for kwargs, message in (
        ({"score_thresh": 1.5}, "score_thresh=1.5: must be in [0, 1]"),
        ({"detections_per_img": 0}, "detections_per_img=0: must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            with_postprocess(tiny["cfg"], **kwargs)


def test_exported_detector_refuses_a_threshold_below_the_compiled_one():
    from frcnn_jax.export.loader import ExportedDetector

    doc = {"canvases": [[128, 128]], "preprocessing": {"min_size": 128, "max_size": 128}, "dynamic_batch": False,
           "batch": 1, "score_thresh": 0.05}  # fmt: skip
    assert ExportedDetector(doc, {}).score_thresh == 0.05
    assert ExportedDetector(doc, {}, score_thresh=0.3).score_thresh == 0.3
    with pytest.raises(ValueError, match="below the artifact's compiled score_thresh 0.05; export again"):
        ExportedDetector(doc, {}, score_thresh=0.01)


def _eval(tiny, out, *flags):
    return subprocess.run(
        [sys.executable, "eval.py", "--config=tests/tiny_config.py", f"--checkpoint={tiny['ckpt']}", f"--out={out}",
         "--max_images=2", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def test_eval_thresholds_below_the_default_change_the_detections(tiny, tmp_path):
    counts = {}
    for name, flags in {
        "default": [],
        "lower": ["--config.model.roi_heads.postprocess.score_thresh=0.0", "--detections_per_img=7"],
    }.items():
        r = _eval(tiny, tmp_path / name, *flags)
        assert r.returncode == 0, r.stderr[-3000:]
        dets = json.loads((tmp_path / name / "detections.json").read_text())
        per_image = {}
        for d in dets:
            per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        counts[name] = per_image
    assert "Post-process: score_thresh 0.0, nms_thresh 0.5, detections_per_img 7" in r.stdout
    assert sum(counts["lower"].values()) > sum(counts["default"].values())
    assert max(counts["lower"].values()) <= 7  # labels 1..5 (the shapes classes) of the 7 kept per image
    r = _eval(tiny, tmp_path / "bad", "--config.model.backbone.depth=101")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --config.model.backbone.depth: the model comes from --checkpoint; only "
        "--config.model.roi_heads.postprocess.* (or --score_thresh, --nms_thresh, --detections_per_img) apply in "
        "this mode"
    ], r.stderr


def _predict(capsys, *args):
    """`python -m frcnn_jax.predict ARGS` in this process (its compiled programs are cached): (code, stdout, stderr)."""
    from frcnn_jax import predict

    try:
        code = predict.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_predict_folder_with_canvases_batches_and_bad_images(tiny, tmp_path, capsys):
    from frcnn_jax.data.images import decode_image
    from frcnn_jax.detector import Detector

    photos = tmp_path / "photos"
    (photos / "more").mkdir(parents=True)
    for name, arr in tiny["photos"].items():
        Image.fromarray(arr).save(photos / f"{name}.png")
    Image.fromarray(tiny["photos"]["port"]).save(photos / "more" / "land.jpg", quality=95)  # stem collision
    (photos / "broken.jpg").write_text("not an image")
    out = tmp_path / "out"
    code, stdout, stderr = _predict(
        capsys, "--checkpoint", tiny["ckpt"], photos, photos / "more" / "land.jpg", tmp_path / "missing.png",
        "--out", out, "--canvas", "128x192", "--canvas", "192x128", "--batch-size", "2", "--score-thresh", "0.0",
    )  # fmt: skip
    assert code == 1, stderr[-3000:]
    assert stderr.splitlines() == [
        f"error: {photos / 'broken.jpg'}: not a readable image (cannot identify image file "
        f"'{photos / 'broken.jpg'}')",
        f"error: {tmp_path / 'missing.png'}: does not exist",
        "2 of 6 images failed",
    ], stderr  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}.{ext}" for n in ("land", "port", "square", "land-2") for ext in ("json", "png")
    )
    assert f"{photos / 'more' / 'land.jpg'}: 40 detections -> {out / 'land-2.png'}" in stdout
    # the same batches through Detector give the same detections
    det = Detector.from_checkpoint(tiny["ckpt"], score_thresh=0.0, canvases=CANVASES, batch_size=2)
    for files, names in (
        ([photos / "land.png", photos / "square.png"], ["land", "square"]),  # canvas (128, 192)
        ([photos / "port.png", photos / "more" / "land.jpg"], ["port", "land-2"]),  # canvas (192, 128)
    ):
        images = [decode_image(f) for f in files]
        for name, image, ref in zip(names, images, det(images)):
            rows = json.loads((out / f"{name}.json").read_text())
            assert len(rows) == len(ref["scores"]) == 40 and Image.open(out / f"{name}.png").size == image.shape[1::-1]
            np.testing.assert_allclose([d["score"] for d in rows], ref["scores"], rtol=1e-6)
            np.testing.assert_allclose([d["box"] for d in rows], ref["boxes"], rtol=1e-6, atol=1e-4)

    # canvases that cannot hold every resized image: one line at start, nothing written
    code, _, stderr = _predict(
        capsys, "--checkpoint", tiny["ckpt"], photos / "land.png", "--out", tmp_path / "o2", "--canvas", "128x192"
    )
    assert code == 2 and stderr.splitlines() == [
        "error: --canvas 128x192: no canvas holds a portrait image resized to (h, w)=(192, 128) (min_size 128, "
        "max_size 192); add a canvas of at least (192, 128)"
    ], stderr
    assert not (tmp_path / "o2").exists()
    for args, message in (
        (["--canvas", "100x128"], "error: --canvas 100x128: canvas (H, W)=(100, 128) must be positive multiples of 32"),
        (["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
        (["--score-thresh", "2"], "error: --score-thresh must be in [0, 1], got 2.0"),
        (["--nms-thresh", "x"], "error: argument --nms-thresh: invalid float value: 'x' (see --help)"),
    ):
        code, _, stderr = _predict(capsys, "--checkpoint", tiny["ckpt"], photos / "land.png", "--out", tmp_path, *args)
        assert code == 2 and stderr.splitlines() == [message], stderr
    code, _, stderr = _predict(capsys, "--checkpoint", tmp_path / "nope", photos, "--out", tmp_path / "o4")
    assert code == 2 and stderr.splitlines() == [f"error: checkpoint {tmp_path / 'nope'} does not exist"], stderr


def test_predict_run_reports_an_inference_error_per_image_and_goes_on(tiny, tmp_path, capsys):
    from frcnn_jax import predict
    from frcnn_jax.detector import Detector

    class FailsOnPortrait(Detector):
        def _forward(self, canvas, images, sizes):
            if canvas == (192, 128):
                raise RuntimeError("device out of memory")
            return super()._forward(canvas, images, sizes)

    det = FailsOnPortrait(tiny["cfg"], tiny["variables"], canvases=CANVASES, batch_size=2, score_thresh=0.0, **SIZES)
    paths = []
    for name, arr in tiny["photos"].items():
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    out.mkdir()
    assert predict.run(det, zip(paths, predict.output_names(paths)), out) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'port.png'}: inference failed (RuntimeError: device out of memory)"]
    assert sorted(p.name for p in out.iterdir()) == ["land.json", "land.png", "square.json", "square.png"]


def test_output_names_are_unique():
    from frcnn_jax.predict import output_names

    paths = [pathlib.Path(p) for p in ("a/x.jpg", "b/x.png", "x-2.jpg", "c/x.jpg", "y.png")]
    assert output_names(paths) == ["x", "x-2", "x-2-2", "x-3", "y"]
