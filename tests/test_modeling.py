"""Model pieces: config validation, FPN upsampling and level mapping, bfloat16, Detector API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
from frcnn_jax.modeling.fpn import upsample_nearest
from frcnn_jax.modeling.poolers import fpn_levels
from frcnn_jax.testing.inputs import random_boxes

SMALL = dict(
    depth=18, width=8, num_classes=4, fpn_channels=16, representation_size=32, rpn_pre_nms_top_n_test=100,
    rpn_post_nms_top_n_test=20, detections_per_img=10, pooler_resolution=7, pooler_sampling_ratio=2,
)  # fmt: skip


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(arch="c5"), "model.arch"),
        (dict(depth=42), "model.depth"),
        (dict(num_classes=1), "model.num_classes"),
        (dict(rpn_nms_thresh=1.5), "model.rpn_nms_thresh"),
        (dict(arch="fpn", anchor_sizes=(32.0, 64.0)), "FPN needs exactly 5 sizes"),
        (dict(rpn_bg_iou_thresh=0.8), "rpn_bg_iou_thresh"),
        (dict(dtype="float16"), "model.dtype"),
    ],
)
def test_model_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**changes)


def test_model_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown model config field.*anchor_size"):
        ModelConfig.from_dict({"anchor_size": [32]})
    cfg = ModelConfig.from_dict({"anchor_sizes": [128, 256, 512]})
    assert cfg.num_anchors_per_location == 9  # the slides' VOC C4: cls_logits 9, bbox_pred 36


@pytest.mark.parametrize("in_hw,out_hw", [((4, 5), (8, 10)), ((3, 5), (7, 9)), ((25, 34), (50, 68)), ((5, 6), (15, 12))])
def test_upsample_nearest_matches_torch(torch, in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(1, *in_hw, 3)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="nearest")
    np.testing.assert_array_equal(np.asarray(upsample_nearest(x, out_hw)), ref.permute(0, 2, 3, 1).numpy())


def test_fpn_levels_match_torchvision(torch):
    from torchvision.ops.poolers import LevelMapper

    boxes = random_boxes(np.random.default_rng(1), 500, min_size=1, max_size=900)
    boxes[:3] = [[0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 448, 448]]  # exact level boundaries
    ref = LevelMapper(2, 5)([torch.from_numpy(boxes)]).numpy()
    np.testing.assert_array_equal(np.asarray(fpn_levels(jnp.asarray(boxes))), ref)


@pytest.mark.parametrize("arch", ["c4", "fpn"])
def test_bfloat16_forward_and_batching(arch):
    cfg = ModelConfig(arch=arch, **SMALL)
    model = FasterRCNN(cfg)
    v = init_variables(model, jax.random.key(0))
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 96, 128, 3)).astype(np.float32)
    sizes = np.array([[96, 128], [80, 100]], np.int32)
    f32_fn = jax.jit(lambda v, x, s: model.apply(v, x, s, return_intermediates=True))
    f32 = f32_fn(v, images, sizes)
    bf = FasterRCNN(cfg.replace(dtype="bfloat16"))
    b16 = jax.jit(lambda v, x, s: bf.apply(v, x, s, return_intermediates=True))(v, images, sizes)
    assert b16["features"][0].dtype == jnp.bfloat16 and b16["boxes"].dtype == jnp.float32
    f, g = np.asarray(f32["features"][0]), np.asarray(b16["features"][0], np.float32)
    assert np.abs(f - g).max() <= 0.05 * np.abs(f).max()
    # image 1 is smaller: its proposals and detections stay inside its true size
    for out in (f32, b16):
        p = np.asarray(out["proposals"][1])[np.asarray(out["proposal_valid"][1])]
        assert (p[:, 2] <= 100).all() and (p[:, 3] <= 80).all()
    # each image's result is independent of the rest of the batch (same compiled program)
    alone = f32_fn(v, images[[1, 1]], sizes[[1, 1]])
    np.testing.assert_allclose(np.asarray(alone["scores"][0]), np.asarray(f32["scores"][1]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(alone["boxes"][0]), np.asarray(f32["boxes"][1]), rtol=1e-4, atol=1e-3)


def test_detector_api_inputs_and_rescaling(tmp_path):
    from frcnn_jax import model_checkpoint as checkpoint
    from frcnn_jax.detector import Detector

    cfg = ModelConfig(arch="fpn", **SMALL).replace(box_score_thresh=0.0)
    v = init_variables(FasterRCNN(cfg), jax.random.key(0))
    path = checkpoint.save_model(tmp_path / "m", v, cfg, {"class_names": ["bg", "a", "b", "c"]})
    det = Detector.from_checkpoint(path, min_size=64, max_size=96, batch_size=2)
    assert det.class_names == ["bg", "a", "b", "c"]
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 255, (120, 90, 3), np.uint8), rng.integers(0, 255, (50, 100), np.uint8), rng.random((64, 64, 4))]
    out = det(imgs)
    assert len(out) == 3
    for img, o in zip(imgs, out):
        h, w = img.shape[:2]
        assert o["boxes"].dtype == np.float32 and o["labels"].dtype == np.int32
        assert (o["boxes"][:, 2] <= w + 1e-3).all() and (o["boxes"][:, 3] <= h + 1e-3).all()
        assert (np.diff(o["scores"]) <= 0).all()
    single = det(imgs[0])
    np.testing.assert_allclose(single["scores"], out[0]["scores"], rtol=1e-5)
    for bad, match in [(np.zeros((5, 5, 2), np.uint8), "images\\[0\\]"), (np.full((5, 5, 3), 2.0), "\\[0, 1\\]")]:
        with pytest.raises(ValueError, match=match):
            det(bad)
    with pytest.raises(ValueError, match="multiples of 32"):
        Detector(cfg, v, canvases=[(100, 100)])
