"""The Mask R-CNN branch on tiny models: config, parameter tree (on and off), shapes, the shared C4 res5,
and its layers against torch (ConvTranspose2d, torchvision's label-channel selection)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import convert
from frcnn_jax.modeling import config as model_config
from frcnn_jax.modeling.architectures import architecture
from frcnn_jax.modeling.config import MaskHeadConfig, ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
from frcnn_jax.modeling.mask_head import conv_transpose_2x2, select_label_masks

SMALL = {  # dotted ModelConfig fields, as tests/test_modeling.py
    "num_classes": 4, "backbone": {"depth": 18, "width": 8, "fpn_channels": 16}, "roi_heads.representation_size": 32,
    "rpn.test": {"pre_nms_top_n": 100, "post_nms_top_n": 20}, "roi_heads.postprocess.detections_per_img": 10,
    "roi_heads.pooler": {"resolution": 7, "sampling_ratio": 2},
}  # fmt: skip
LIGHT_MASK = {  # a lighter head than torchvision's, as the shapes demo uses
    "fpn": {"mask.enabled": True, "mask.conv_channels": (16, 16), "mask.predictor_channels": 8},
    "c4": {"mask.enabled": True, "mask.conv_channels": (), "mask.pooler.sampling_ratio": 0,
           "mask.predictor_channels": 8},
}  # fmt: skip


def small(arch: str, mask: bool) -> ModelConfig:
    return ModelConfig.from_dict({**SMALL, "arch": arch, **(LIGHT_MASK[arch] if mask else {})})


def _paths(tree) -> set[str]:
    return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def models():
    """{(arch, mask): (cfg, model, variables)} for the tiny R-18 models."""
    out = {}
    for arch in ("c4", "fpn"):
        for mask in (False, True):
            cfg = small(arch, mask)
            model = FasterRCNN(cfg)
            out[arch, mask] = (cfg, model, init_variables(model, jax.random.key(0)))
    return out


def test_recipes_and_config():
    fpn, c4 = model_config.maskrcnn_r50_fpn(), model_config.maskrcnn_r50_c4()
    assert fpn.mask == MaskHeadConfig(True, model_config.PoolerConfig(14, 2, False), (256,) * 4, 256, 3)
    assert fpn.replace(mask=MaskHeadConfig()) == model_config.r50_fpn()  # the box model is untouched
    assert c4.mask == MaskHeadConfig(True, model_config.PoolerConfig(14, 0, False), (), 256, 3)
    assert c4.replace(mask=MaskHeadConfig()) == model_config.r50_c4()
    assert architecture(fpn).mask_resolution == 28 and architecture(c4).mask_resolution == 14
    light = model_config.maskrcnn_r50_fpn(**{"mask.conv_channels": [32, 32]})
    assert light.mask.conv_channels == (32, 32)
    # round trip through JSON-like dicts; the default (off) section is not written at all
    assert ModelConfig.from_dict(fpn.to_dict()) == fpn and ModelConfig.from_dict(c4.to_dict()) == c4
    assert "mask" not in model_config.r50_fpn().to_dict() and "mask" not in ModelConfig().to_dict()
    with pytest.raises(ValueError, match=r"model.mask.train_buckets=0: must be a positive integer"):
        model_config.maskrcnn_r50_fpn(**{"mask.train_buckets": 0})
    with pytest.raises(ValueError, match=r"model.mask.conv_channels=\(256,\): must be empty for C4"):
        model_config.maskrcnn_r50_c4(**{"mask.conv_channels": (256,)})
    with pytest.raises(ValueError, match="model.mask.predictor_channels=0"):
        model_config.maskrcnn_r50_fpn(**{"mask.predictor_channels": 0})
    with pytest.raises(ValueError, match="unknown config field.*model.mask.channels"):
        ModelConfig.from_dict({"mask.channels": 3})


@pytest.mark.parametrize("arch", ["c4", "fpn"])
def test_parameter_tree_off_and_on(models, arch):
    _, _, off = models[arch, False]
    _, _, on = models[arch, True]
    # off: the Faster R-CNN tree, nothing under roi_heads but the box head and predictor
    assert sorted(off["params"]["roi_heads"]) == ["box_head", "box_predictor"]
    assert _paths(off["frozen"]) == _paths(on["frozen"])
    added = _paths(on["params"]) - _paths(off["params"])
    assert _paths(off["params"]) <= _paths(on["params"])
    shapes = jax.tree.map(np.shape, on["params"]["roi_heads"])
    if arch == "fpn":  # torchvision's names: mask_head.{i}.0, mask_predictor.{conv5_mask, mask_fcn_logits}
        assert added == {
            f"roi_heads/{p}" for p in ("mask_head/0/0/kernel", "mask_head/0/0/bias", "mask_head/1/0/kernel",
                                       "mask_head/1/0/bias", "mask_predictor/conv5_mask/kernel",
                                       "mask_predictor/conv5_mask/bias", "mask_predictor/mask_fcn_logits/kernel",
                                       "mask_predictor/mask_fcn_logits/bias")
        }  # fmt: skip
        assert shapes["mask_head"]["1"]["0"]["kernel"] == (3, 3, 16, 16)
        assert shapes["mask_predictor"]["conv5_mask"]["kernel"] == (2, 2, 16, 8)
    else:  # C4: no mask_head parameters, the predictor reads res5's output (ResNet-18: 64 channels)
        assert {p.split("/")[1] for p in added} == {"mask_predictor"}
        assert shapes["mask_predictor"]["conv5_mask"]["kernel"] == (2, 2, 64, 8)
    assert shapes["mask_predictor"]["mask_fcn_logits"]["kernel"] == (1, 1, 8, 4)


@pytest.mark.parametrize("arch", ["c4", "fpn"])
def test_forward_outputs_masks(models, arch):
    cfg, model, v = models[arch, True]
    _, off_model, off_v = models[arch, False]
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 128, 128, 3)), jnp.float32)
    sizes = jnp.array([[128, 128], [96, 112]], jnp.int32)
    fn = jax.jit(model.apply)
    out = jax.device_get(fn(v, images, sizes))
    m = architecture(cfg).mask_resolution
    assert m == (28 if arch == "fpn" else 14)
    assert out["masks"].shape == (2, 10, m, m) and out["masks"].dtype == np.float32
    assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()
    assert (out["masks"][~out["valid"]] == 0).all() and out["valid"].any()
    # the box outputs are the Faster R-CNN model's (same shared parameters)
    off_params = {"params": {k: v["params"][k] for k in off_v["params"]}, "frozen": v["frozen"]}
    off_params["params"]["roi_heads"] = {k: v["params"]["roi_heads"][k] for k in ("box_head", "box_predictor")}
    box_only = jax.device_get(jax.jit(off_model.apply)(off_params, images, sizes))
    assert set(box_only) == {"boxes", "scores", "labels", "valid"}
    for key in box_only:
        np.testing.assert_array_equal(out[key], box_only[key])
    if arch == "c4":  # the mask head IS the box head's res5: changing it changes the masks
        bumped = jax.tree.map(lambda x: x, v)
        conv = bumped["params"]["roi_heads"]["box_head"]["layer4"]["1"]["conv2"]
        conv["kernel"] = conv["kernel"] * 3.0
        again = jax.device_get(fn(bumped, images, sizes))
        valid = out["valid"] & again["valid"]
        np.testing.assert_array_equal(out["boxes"][valid].shape, again["boxes"][valid].shape)
        assert np.abs(again["masks"] - out["masks"])[valid].max() > 1e-3


def test_conv_transpose_matches_torch(torch):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)  # NHWC
    layer = torch.nn.ConvTranspose2d(7, 4, kernel_size=2, stride=2)
    with torch.no_grad():
        ref = layer(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    kernel = convert._transform(
        ("roi_heads", "mask_predictor", "conv5_mask", "kernel"), layer.weight.detach().numpy(), 7
    )
    assert kernel.shape == (2, 2, 7, 4)
    got = conv_transpose_2x2(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(layer.bias.detach().numpy()))
    assert got.shape == (3, 10, 12, 4)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_select_label_masks_matches_torchvision(torch):
    from torchvision.models.detection.roi_heads import maskrcnn_inference

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 5, 5, 4)).astype(np.float32) * 4
    labels = rng.integers(0, 4, 6).astype(np.int32)
    ref = maskrcnn_inference(torch.from_numpy(logits).permute(0, 3, 1, 2), [torch.from_numpy(labels).long()])[0]
    got = np.asarray(select_label_masks(jnp.asarray(logits), jnp.asarray(labels)))
    np.testing.assert_allclose(got, ref[:, 0].numpy(), rtol=1e-6, atol=1e-7)


def test_predictor_label_channel_equals_the_full_logits_picked():
    """`MaskRCNNPredictor(x, labels)` (each row's label channel, the 2x2 blocks interleaved after the
    pick) against the full [R, 2s, 2s, K] logits with the label channel taken: same values, and
    `label_mask_loss` on it gives `mask_loss`'s loss and parameter gradients."""
    from frcnn_jax.modeling.mask_head import MaskRCNNPredictor, label_mask_loss, mask_loss

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(6, 4, 5, 16)).astype(np.float32))
    labels = jnp.asarray([0, 4, 2, 2, 1, 3], jnp.int32)
    targets = jnp.asarray(rng.uniform(size=(6, 8, 10)).astype(np.float32))
    valid = jnp.asarray([True, True, False, True, True, True])
    pred = MaskRCNNPredictor(5, 8)
    v = pred.init(jax.random.key(0), x)
    v = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.normal(size=a.shape), a.dtype), v)  # non-zero biases
    full = pred.apply(v, x)
    assert full.shape == (6, 8, 10, 5)
    picked = pred.apply(v, x, labels)
    assert picked.shape == (6, 8, 10) and picked.dtype == jnp.float32
    np.testing.assert_allclose(picked, np.moveaxis(np.asarray(full), -1, 1)[np.arange(6), labels], rtol=1e-5, atol=1e-5)

    def via_full(v_):
        return mask_loss(jnp.moveaxis(pred.apply(v_, x), -1, 1), labels, targets, valid)

    def via_label(v_):
        return label_mask_loss(pred.apply(v_, x, labels), targets, valid)

    (a, ga), (b, gb) = jax.value_and_grad(via_full)(v), jax.value_and_grad(via_label)(v)
    np.testing.assert_allclose(b, a, rtol=1e-6)
    for p, q in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(q, p, rtol=1e-5, atol=1e-6)
