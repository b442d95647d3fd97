"""The optax train step: learning, optimiser semantics, and 8-device data parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import LOSS_NAMES, FasterRCNN, init_variables
from frcnn_jax.training import sharding
from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer, param_labels
from frcnn_jax.training.train_step import create_train_state, make_train_step

TINY = {  # dotted ModelConfig fields (`ModelConfig.from_dict`)
    "num_classes": 4, "backbone.depth": 18, "backbone.width": 8, "backbone.freeze_at": 0,
    "backbone.zero_init_residual": True, "anchors.sizes": (16.0, 32.0, 64.0),
    "rpn.train": {"pre_nms_top_n": 200, "post_nms_top_n": 32}, "rpn.test": {"pre_nms_top_n": 100, "post_nms_top_n": 16},
    "rpn.assigner.batch_size_per_image": 64, "roi_heads.pooler": {"resolution": 6, "sampling_ratio": 2},
    "roi_heads.assigner.batch_size_per_image": 16, "roi_heads.postprocess.detections_per_img": 10,
}  # fmt: skip


def tiny_batch(b=8, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (b, size, size, 3)).astype(np.float32)
    boxes = np.zeros((b, 4, 4), np.float32)
    labels = np.zeros((b, 4), np.int32)
    valid = np.zeros((b, 4), bool)
    for i in range(b):
        for j in range(int(rng.integers(0, 4))):  # some images have no boxes
            x, y = rng.uniform(0, size - 24, 2)
            s = rng.uniform(12, 24)
            boxes[i, j] = [x, y, x + s, y + s]
            labels[i, j] = rng.integers(1, 4)
            valid[i, j] = True
            images[i, int(y) : int(y + s), int(x) : int(x + s), labels[i, j] - 1] += 3.0
    crowd = np.zeros_like(valid)
    crowd[0, 0] = valid[0, 0]  # a crowd box is ignored
    return {
        "image": images, "image_size": np.full((b, 2), size, np.int32), "boxes": boxes, "labels": labels,
        "gt_valid": valid, "is_crowd": crowd,
    }  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    model = FasterRCNN(ModelConfig.from_dict(TINY))
    variables = init_variables(model, jax.random.key(0))
    ocfg = OptimConfig(base_lr=0.02, warmup_steps=2, decay_steps=(50,), total_steps=100)
    state, tx = create_train_state(model, variables, ocfg, seed=0)
    return model, state, tx, ocfg


def test_losses_decrease_and_are_named(setup):
    model, state, tx, ocfg = setup
    step = jax.jit(make_train_step(model, tx, learning_rate_schedule(ocfg)))
    batch = tiny_batch()
    first = None
    for _ in range(8):
        state, metrics = step(state, batch)
        metrics = jax.device_get(metrics)
        first = first or metrics
    assert set(LOSS_NAMES) <= set(metrics)
    assert all(np.isfinite(metrics[k]) for k in LOSS_NAMES)
    assert metrics["loss"] < first["loss"]
    assert int(state.step) == 8


def test_sharded_step_equals_single_device(setup):
    assert jax.device_count() == 8, "tests run with 8 simulated CPU devices (see conftest.py)"
    model, state, tx, ocfg = setup
    fn = make_train_step(model, tx, learning_rate_schedule(ocfg))
    batch = tiny_batch(b=8, seed=1)
    single_state, single_metrics = jax.jit(fn)(state, batch)

    mesh = sharding.data_mesh()
    placed = jax.device_put(state, sharding.replicated(mesh))
    sharded = sharding.shard_train_step(fn, mesh, placed)
    gbatch = sharding.put_batch(batch, mesh)
    assert len(gbatch["image"].sharding.device_set) == 8
    new_state, metrics = sharded(placed, gbatch)
    for k in LOSS_NAMES:
        np.testing.assert_allclose(metrics[k], single_metrics[k], rtol=1e-5, atol=1e-7)
    flat_a = jax.tree.leaves(single_state.params)
    flat_b = jax.tree.leaves(new_state.params)
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_batch_must_divide_devices():
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        sharding.put_batch(tiny_batch(b=6), sharding.data_mesh())


def test_optimizer_masks_and_schedule():
    params = {
        "backbone": {"body": {"conv1": {"kernel": jnp.ones((3, 3, 3, 4))}, "layer2": {"b": {"bias": jnp.ones(4)}}}}
    }
    labels = param_labels(params, ["backbone/body/conv1"])
    assert labels["backbone"]["body"]["conv1"]["kernel"] == "frozen"
    assert labels["backbone"]["body"]["layer2"]["b"]["bias"] == "bias"
    cfg = OptimConfig(
        base_lr=0.1, weight_decay=0.5, warmup_steps=10, warmup_factor=0.1, decay_steps=(20, 30), gamma=0.1
    )
    lr = learning_rate_schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(25), lr(35)], [0.01, 0.055, 0.1, 0.01, 0.001], rtol=1e-6)
    tx = make_optimizer(cfg, params, ["backbone/body/conv1"])
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["backbone"]["body"]["conv1"]["kernel"]).max()) == 0.0  # frozen
    # bias: no weight decay, lr(0) = 0.01 -> update -0.01
    np.testing.assert_allclose(updates["backbone"]["body"]["layer2"]["b"]["bias"], -0.01, rtol=1e-6)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("base_lr", -0.1, "optim.base_lr"),
        ("schedule", "linear", "optim.schedule"),
        ("decay_steps", (10, 5), "decay_steps"),
    ],
)
def test_bad_optim_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        OptimConfig(**{field: value})
    with pytest.raises(ValueError, match="unknown config field.*optim.lr"):
        OptimConfig.from_dict({"lr": 0.1})
