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

SMALL = {  # dotted ModelConfig fields (`ModelConfig.from_dict`)
    "num_classes": 4, "backbone": {"depth": 18, "width": 8, "fpn_channels": 16}, "roi_heads.representation_size": 32,
    "rpn.test": {"pre_nms_top_n": 100, "post_nms_top_n": 20}, "roi_heads.postprocess.detections_per_img": 10,
    "roi_heads.pooler": {"resolution": 7, "sampling_ratio": 2},
}  # fmt: skip


def small(arch: str, **dotted) -> ModelConfig:
    return ModelConfig.from_dict({**SMALL, "arch": arch, **dotted})


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"arch": "c5"}, "model.arch"),
        ({"backbone.depth": 42}, "model.backbone.depth"),
        ({"num_classes": 1}, "model.num_classes"),
        ({"rpn.nms_thresh": 1.5}, "model.rpn.nms_thresh"),
        ({"arch": "fpn", "anchors.sizes": (32.0, 64.0)}, "FPN needs exactly 5 sizes"),
        ({"rpn.assigner.bg_iou_thresh": 0.8}, "model.rpn.assigner.bg_iou_thresh"),
        ({"roi_heads.postprocess.detections_per_img": 0}, "model.roi_heads.postprocess.detections_per_img"),
        ({"dtype": "float16"}, "model.dtype"),
    ],
)
def test_model_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(changes)


def test_model_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown config field.*model.anchors.size;.*fields of model.anchors: sizes"):
        ModelConfig.from_dict({"anchors": {"size": [32]}})
    with pytest.raises(ValueError, match="unknown config field.*model.anchor_sizes"):
        ModelConfig.from_dict({"anchor_sizes": [32]})
    with pytest.raises(ValueError, match="model.rpn.train=.*a section"):
        ModelConfig.from_dict({"rpn.train": 12})
    cfg = ModelConfig.from_dict({"anchors": {"sizes": [128, 256, 512]}})
    assert cfg.num_anchors_per_location == 9  # the slides' VOC C4: cls_logits 9, bbox_pred 36
    # nested and dotted keys say the same; to_dict round-trips (lists for tuples, as JSON)
    assert ModelConfig.from_dict({"anchors.sizes": (128, 256, 512)}) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["anchors"]["sizes"] == [128.0, 256.0, 512.0]
    # the defaults of a partly given section stay (rpn.train keeps its post_nms_top_n)
    assert ModelConfig.from_dict({"rpn.train.pre_nms_top_n": 5}).rpn.train.post_nms_top_n == 2000


def test_config_files_build_their_model_config():
    """Every configs/*.py model section is a valid nested ModelConfig; overrides work in the dotted style."""
    import importlib
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO))
    masked = ("shapes_mask", "maskrcnn_r50_fpn_coco", "maskrcnn_r50_c4_coco")
    for name in ("default", "shapes_c4", "r50_c4_coco", "r50_c4_voc", "r50_fpn_coco", "coco128_fpn", *masked):
        config = importlib.import_module(f"configs.{name}").get_config()
        cfg = ModelConfig.from_dict(config.model.to_dict())
        assert cfg.num_classes >= 2 and "total_steps" not in config.optim
        assert cfg.mask.enabled == (name in masked) == bool(config.data.masks)
    from frcnn_jax.modeling import config as recipes

    # the COCO mask recipes are the package's, unchanged
    fpn = importlib.import_module("configs.maskrcnn_r50_fpn_coco").get_config()
    assert ModelConfig.from_dict(fpn.model.to_dict()) == recipes.maskrcnn_r50_fpn(num_classes=81)
    assert (fpn.train.num_steps, fpn.optim.decay_steps, fpn.optim.base_lr) == (26 * 7330, (16 * 7330, 22 * 7330), 0.02)
    c4 = importlib.import_module("configs.maskrcnn_r50_c4_coco").get_config()
    assert ModelConfig.from_dict(c4.model.to_dict()) == recipes.maskrcnn_r50_c4(num_classes=81)
    assert (c4.train.num_steps, c4.data.batch_size, c4.optim.base_lr) == (180_000, 8, 0.01)
    for config in (fpn, c4):  # masks come from COCO JSON (tfds coco/2017 has none)
        assert config.data.source == "coco_json"
        assert config.data.coco_json.val_annotations == "data/coco/annotations/instances_val2017.json"
    config = importlib.import_module("configs.r50_fpn_coco").get_config()
    config.model.rpn.nms_thresh = 0.6
    assert ModelConfig.from_dict(config.model.to_dict()).rpn.nms_thresh == 0.6


@pytest.mark.parametrize(
    "in_hw,out_hw", [((4, 5), (8, 10)), ((3, 5), (7, 9)), ((25, 34), (50, 68)), ((5, 6), (15, 12))]
)
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
    cfg = small(arch)
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

    cfg = small("fpn", **{"roi_heads.postprocess.score_thresh": 0.0})
    v = init_variables(FasterRCNN(cfg), jax.random.key(0))
    path = checkpoint.save_model(tmp_path / "m", v, cfg, {"class_names": ["bg", "a", "b", "c"]})
    det = Detector.from_checkpoint(path, min_size=64, max_size=96, batch_size=2)
    assert det.class_names == ["bg", "a", "b", "c"]
    rng = np.random.default_rng(3)
    imgs = [
        rng.integers(0, 255, (120, 90, 3), np.uint8),
        rng.integers(0, 255, (50, 100), np.uint8),
        rng.random((64, 64, 4)),
    ]
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


def test_flat_config_checkpoints_are_refused_with_a_hint(tmp_path):
    import json

    from frcnn_jax import model_checkpoint as checkpoint

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.json").write_text(json.dumps({"format": "frcnn_jax.model/1", "model": {"depth": 50}}))
    with pytest.raises(ValueError, match="frcnn_jax.model/1.*flat model config of older versions: convert it again"):
        checkpoint.read_model_json(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(json.dumps({"format": "frcnn_jax.model/1", "model": None}))
    assert checkpoint.read_model_json(tmp_path / "m")["model"] is None  # a backbone: no model config to read
