"""Mask R-CNN training at the model level (tiny width-8 R-18 models, 64 px canvases).

`FasterRCNN.losses` of a mask model adds `loss_mask`: gradients reach the mask head (FPN)
and, for C4, the box head's res5 it shares; without a foreground ROI the loss and its
gradients are exactly zero; the model's value equals `mask_head.mask_loss` on the sampled
foreground ROIs run through the inference path (`RoIHeads.masks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.data import masks as host_masks
from frcnn_jax.modeling import mask_head
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import ALL_LOSS_NAMES, FasterRCNN, init_variables, loss_names
from frcnn_jax.modeling.roi_heads import box_head_targets
from frcnn_jax.modeling.rpn import rpn_anchors, rpn_proposals
from frcnn_jax.training.optim import OptimConfig
from frcnn_jax.training.train_step import create_train_state, make_train_step, metric_names
from test_train_step import TINY, tiny_batch

S = 16  # host crop size
MASK = {
    "mask.enabled": True, "mask.conv_channels": (8,), "mask.predictor_channels": 8, "backbone.fpn_channels": 16,
    "roi_heads.representation_size": 32,
}  # fmt: skip
FPN = {
    **TINY,
    **MASK,
    "arch": "fpn",
    "anchors.sizes": (8.0, 16.0, 32.0, 64.0, 128.0),
    "mask.pooler": {"resolution": 7, "sampling_ratio": 2, "aligned": False},
}
C4 = {
    **TINY, **MASK, "arch": "c4", "mask.conv_channels": (), "roi_heads.pooler": {"resolution": 6, "sampling_ratio": 0},
    "mask.pooler": {"resolution": 6, "sampling_ratio": 0, "aligned": False},
}  # fmt: skip


def mask_batch(b=4, size=64, seed=0, empty=False):
    """`tiny_batch` + an ellipse inside each box as its mask, cropped as the pipeline crops them."""
    batch = tiny_batch(b, size, seed)
    if empty:
        batch["gt_valid"][:] = False
    g = batch["boxes"].shape[1]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    gt_masks, gt_boxes = np.zeros((b, g, S, S), np.uint8), np.zeros((b, g, 4), np.float32)
    for i in range(b):
        full = np.zeros((g, size, size), np.uint8)
        for j in range(g):
            x1, y1, x2, y2 = batch["boxes"][i, j]
            if batch["gt_valid"][i, j]:
                cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
                full[j] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        crops, boxes = host_masks.crop_instance_masks(full, (size, size), False, S)
        gt_masks[i], gt_boxes[i] = crops, boxes
    return {**batch, "gt_masks": gt_masks, "gt_mask_boxes": gt_boxes}


@pytest.fixture(scope="module", params=["fpn", "c4"])
def built(request):
    cfg = ModelConfig.from_dict(FPN if request.param == "fpn" else C4)
    model = FasterRCNN(cfg)
    return model, init_variables(model, jax.random.key(0))


def _mask_loss_and_grads(model, variables, batch, *, with_temp_bytes=False):
    def fn(params):
        losses, _ = model.apply({**variables, "params": params}, batch, jax.random.key(1), method=FasterRCNN.losses)
        return losses["loss_mask"], losses

    compiled = jax.jit(jax.value_and_grad(fn, has_aux=True)).lower(variables["params"]).compile()
    out = compiled(variables["params"])
    return (out, compiled.memory_analysis().temp_size_in_bytes) if with_temp_bytes else out


def _norm(tree) -> float:
    return float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))


def test_loss_names_follow_the_config():
    assert loss_names(ModelConfig.from_dict(TINY)) == ALL_LOSS_NAMES[:4]
    assert loss_names(ModelConfig.from_dict(FPN)) == ALL_LOSS_NAMES
    assert "loss_mask" in metric_names(ModelConfig.from_dict(FPN))
    assert "loss_mask" not in metric_names(ModelConfig.from_dict(TINY))


def test_gradients_reach_the_mask_head(built):
    model, variables = built
    (loss, losses), grads = _mask_loss_and_grads(model, variables, mask_batch())
    assert set(losses) == set(loss_names(model.cfg))
    assert np.isfinite(float(loss)) and float(loss) > 0.1  # BCE of near-zero logits: ~log 2
    heads = grads["roi_heads"]
    assert _norm(heads["mask_predictor"]) > 0
    if model.cfg.arch == "fpn":
        assert _norm(heads["mask_head"]) > 0
        assert _norm(grads["backbone"]["fpn"]) > 0
    else:  # C4: no mask_head parameters; the loss trains the box head's res5 it shares
        assert "mask_head" not in heads
        assert _norm(heads["box_head"]["layer4"]) > 0
    assert _norm(heads["box_predictor"]) == 0  # the mask loss alone does not touch the box predictor


def test_no_positive_gives_zero_loss_and_zero_gradient(built):
    model, variables = built
    (loss, losses), grads = _mask_loss_and_grads(model, variables, mask_batch(empty=True))
    assert float(loss) == 0.0
    assert _norm(grads) == 0.0
    assert all(np.isfinite(float(v)) for v in losses.values())


def _reference_mask_loss(module: FasterRCNN, batch, key):
    """`mask_loss` recomputed outside `RoIHeads.losses`: the same samples, the mask logits' label
    channel read back through the inference path (`RoIHeads.masks`' probabilities)."""
    cfg = module.cfg
    images, sizes = batch["image"], batch["image_size"]
    canvas_hw = images.shape[1:3]
    gt_valid = batch["gt_valid"] & ~batch["is_crowd"]
    _, k_roi = jax.random.split(key)
    feats = module.features(images)
    objectness, deltas = module.rpn(feats)
    anchors = rpn_anchors(cfg, canvas_hw, feats)
    props, _, prop_valid = rpn_proposals(cfg, objectness, deltas, anchors, sizes, train=True)
    a = cfg.roi_heads.assigner
    sample = jax.vmap(
        lambda k, p, v, gb, gl, gv: box_head_targets(
            k, p, v, gb, gl, gv, fg_iou_thresh=a.fg_iou_thresh, bg_iou_thresh=a.bg_iou_thresh,
            batch_size_per_image=a.batch_size_per_image, positive_fraction=a.positive_fraction,
            bbox_reg_weights=cfg.roi_heads.bbox_reg_weights,
        )
    )(jax.random.split(k_roi, images.shape[0]), props, prop_valid, batch["boxes"], batch["labels"], gt_valid)  # fmt: skip
    m = 2 * cfg.mask.pooler.resolution if cfg.arch == "fpn" else cfg.roi_heads.pooler.resolution
    t = mask_head.mask_head_targets(
        sample["boxes"], sample["labels"], sample["valid"], sample["matched"], batch["gt_masks"],
        batch["gt_mask_boxes"], sizes, num_positives=int(a.batch_size_per_image * a.positive_fraction), mask_size=m,
    )  # fmt: skip
    probs = module.roi_heads.masks(feats, t["boxes"], t["labels"], t["valid"], canvas_hw)  # [B, P, M, M]
    logits = jnp.log(probs) - jnp.log1p(-probs)  # the label channel's logits, one channel
    return mask_head.mask_loss(logits[:, :, None], jnp.zeros_like(t["labels"]), t["targets"], t["valid"]), t


def test_model_loss_equals_the_pure_function(built):
    model, variables = built
    batch = jax.tree.map(jnp.asarray, mask_batch(seed=7))
    key = jax.random.key(5)
    losses, _ = jax.jit(lambda v, b: model.apply(v, b, key, method=FasterRCNN.losses))(variables, batch)
    ref, t = jax.jit(lambda v, b: model.apply(v, b, key, method=_reference_mask_loss))(variables, batch)
    assert int(jnp.sum(t["valid"])) > 4  # the comparison covers real positives
    np.testing.assert_allclose(float(losses["loss_mask"]), float(ref), rtol=2e-4)


def test_remat_and_bfloat16_mask_model_trains_a_step():
    cfg = ModelConfig.from_dict({**FPN, "remat": "all", "dtype": "bfloat16"})
    model = FasterRCNN(cfg)
    ocfg = OptimConfig(base_lr=0.01, warmup_steps=1, decay_steps=(50,), total_steps=100)
    state, tx = create_train_state(model, init_variables(model, jax.random.key(0)), ocfg, seed=0)
    state, metrics = jax.jit(make_train_step(model, tx))(state, mask_batch())
    assert set(loss_names(cfg)) <= set(metrics)
    assert all(np.isfinite(float(metrics[k])) for k in loss_names(cfg))
    assert float(metrics["loss_mask"]) > 0


def test_slot_buckets_and_the_bucket_that_holds_every_image():
    assert mask_head.slot_buckets(128, 3) == (32, 64, 128)
    assert mask_head.slot_buckets(128, 1) == (128,)
    assert mask_head.slot_buckets(2, 3) == (1, 2)
    buckets = (32, 64, 128)
    valid = np.zeros((2, 128), bool)
    assert int(mask_head.bucket_index(valid, buckets)) == 0  # no positive: the smallest
    for most, want in ((1, 0), (32, 0), (33, 1), (64, 1), (65, 2), (128, 2)):
        valid[:] = False
        valid[1, :most] = True
        valid[0, : most // 2] = True
        assert int(mask_head.bucket_index(valid, buckets)) == want, most


@pytest.mark.parametrize(("arch", "buckets", "taken"), [("fpn", 2, 0), ("c4", 3, 1)])
def test_bucketed_mask_head_gives_the_loss_and_gradients_of_all_slots(arch, buckets, taken):
    """`mask.train_buckets` runs the head on fewer slots; the loss and gradients are those of P slots.

    P = 16; FPN: buckets (8, 16), its batch's 3 positives take 8 slots; C4: (4, 8, 16), its 5
    take 8, past the smallest (1 slot fewer would drop positives). FPN keeps to 2 buckets:
    each compiles its 4-level pooler's forward and backward once more. The buckets'
    activations do not add up: the program's temporary buffers are those of P slots alone
    (`resnet.remat_switch`; a plain differentiated switch holds every bucket's residuals).
    """
    base = {**(FPN if arch == "fpn" else C4), "roi_heads.assigner.batch_size_per_image": 64}
    batch = jax.tree.map(jnp.asarray, mask_batch(seed=0))
    out, temp = {}, {}
    for n in (1, buckets):
        model = FasterRCNN(ModelConfig.from_dict({**base, "mask.train_buckets": n}))
        variables = init_variables(model, jax.random.key(0))
        ((loss, _), grads), temp[n] = _mask_loss_and_grads(model, variables, batch, with_temp_bytes=True)
        out[n] = float(loss), grads
    assert temp[buckets] <= 1.02 * temp[1], temp
    _, t = jax.jit(functools.partial(model.apply, method=_reference_mask_loss))(variables, batch, jax.random.key(1))
    # the same samples (key 1) as the losses: which program ran
    assert int(mask_head.bucket_index(t["valid"], mask_head.slot_buckets(16, buckets))) == taken
    (loss_all, grads_all), (loss_few, grads_few) = out[1], out[buckets]
    assert loss_all > 0.1
    np.testing.assert_allclose(loss_few, loss_all, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_all), jax.tree.leaves(grads_few), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
