"""Rematerialisation (`ModelConfig.remat`): same parameters, losses and gradients as "none".

`remat` only changes what the backward pass keeps from the forward pass and recomputes
(see `frcnn_jax.modeling.config.REMAT_PARTS` and `resnet.remat_call`), so every setting
must give the same parameter tree (checkpoints and the torchvision converter depend on
its names), the same four losses and the same gradients, up to float rounding.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest

from frcnn_jax.modeling import conv
from frcnn_jax.modeling.config import REMAT_PARTS, ModelConfig
from frcnn_jax.modeling.faster_rcnn import LOSS_NAMES, FasterRCNN, init_variables
from frcnn_jax.training.train_step import compute_losses
from test_train_step import TINY, tiny_batch

# Every layer trains (freeze_at=0) and no residual branch starts at zero, so every
# gradient is non-trivial. FPN: 128 channels, so that (with `_custom_conv_vjp`) its 3x3
# convs and the RPN conv take conv.py's custom-VJP kernel gradient.
CONFIGS = {
    "c4": {**TINY, "backbone.zero_init_residual": False},
    "fpn": {
        **TINY,
        "arch": "fpn",
        "backbone.zero_init_residual": False,
        "anchors.sizes": (16.0, 32.0, 64.0, 128.0, 256.0),
        "backbone.fpn_channels": 128,
        "roi_heads.representation_size": 32,
    },  # fmt: skip
}
KEY = jax.random.key(3)


@pytest.fixture(autouse=True)
def _custom_conv_vjp(monkeypatch):
    """Route every 3x3 conv with >= 128 input channels through conv.py's custom VJP on CPU."""
    monkeypatch.setattr(conv, "_DOT_KERNEL_GRAD_MIN_ELEMENTS", 0)
    assert conv._use_dot_kernel_grad((2, 16, 16, 128))


def _count(pattern: str, jaxpr_text: str) -> int:
    return len(re.findall(pattern, jaxpr_text))


def _losses_and_grads(cfg: ModelConfig, variables, batch):
    """(4 losses {name: float}, gradient tree like variables["params"], jaxpr of the gradient)."""
    model = FasterRCNN(cfg)

    def loss_fn(params):
        total, losses, _ = compute_losses(model, params, variables["frozen"], batch, KEY)
        return total, losses

    traced = jax.jit(jax.value_and_grad(loss_fn, has_aux=True)).trace(variables["params"])
    (_, losses), grads = traced.lower().compile()(variables["params"])
    return jax.device_get(losses), jax.device_get(grads), str(traced.jaxpr)


@functools.cache
def _reference(arch: str):
    """(variables, losses, grads, gradient jaxpr) of the "none" setting, once per arch."""
    cfg = ModelConfig.from_dict(CONFIGS[arch])
    variables = init_variables(FasterRCNN(cfg), jax.random.key(0))
    return (variables, *_losses_and_grads(cfg, variables, tiny_batch(b=2)))


def _assert_trees_close(a, b, rtol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(float(np.abs(x).max()), 1e-12)  # rounding of a sum is relative to its terms
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * scale, err_msg=jax.tree_util.keystr(path))


def _abstract_variables(cfg: ModelConfig):
    """{path: (shape, dtype)} of the variables `init_variables` creates (traced, not compiled)."""
    tree = jax.eval_shape(lambda: init_variables(FasterRCNN(cfg), jax.random.key(0)))
    return {jax.tree_util.keystr(p): (v.shape, v.dtype) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("arch", ["c4", "fpn"])
def test_remat_keeps_the_parameter_tree(arch):
    trees = {r: _abstract_variables(ModelConfig.from_dict({**CONFIGS[arch], "remat": r})) for r in REMAT_PARTS}
    assert all(t == trees["none"] for t in trees.values())  # same paths, shapes and dtypes
    assert any("backbone']['body']['layer2']['0']['conv1']['kernel']" in p for p in trees["none"])


@pytest.mark.parametrize("arch,remat", [("fpn", "backbone"), ("fpn", "all"), ("c4", "all")])
def test_remat_keeps_losses_and_gradients(arch, remat):
    variables, ref_losses, ref_grads, ref_jaxpr = _reference(arch)
    cfg = ModelConfig.from_dict({**CONFIGS[arch], "remat": remat})
    losses, grads, jaxpr = _losses_and_grads(cfg, variables, tiny_batch(b=2))
    for name in LOSS_NAMES:
        np.testing.assert_allclose(losses[name], ref_losses[name], rtol=1e-5, err_msg=name)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(ref_grads["backbone"]))  # a non-trivial check
    _assert_trees_close(ref_grads, grads, rtol=1e-5)
    # The setting did rematerialise: the ResNet blocks' convolutions appear again in the
    # backward pass, and every rematerialised call ties its inputs to the cotangent (an `abs`).
    convs = r"conv_general_dilated\[|dot_general\["
    assert _count(convs, jaxpr) > _count(convs, ref_jaxpr)
    # Ties: one per trained block (R-18: 2 per stage), FPN conv (8), RPN conv and level (3 x levels), fc6/fc7 or layer4 block.
    ties = {"backbone": 8, "all": 8 + 8 + 3 * 5 + 2} if arch == "fpn" else {"all": 6 + 3 * 1 + 2}
    assert _count(r"= abs ", jaxpr) - _count(r"= abs ", ref_jaxpr) == ties[remat]


def test_remat_leaves_inference_unchanged():
    cfg = ModelConfig.from_dict(CONFIGS["fpn"])
    variables = _reference("fpn")[0]
    images = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    sizes = np.array([[64, 64]], np.int32)
    outs = {}
    for remat in ("none", "all"):
        model = FasterRCNN(cfg.replace(remat=remat))
        fn = jax.jit(functools.partial(model.apply, return_intermediates=True))
        outs[remat] = jax.device_get(fn(variables, images, sizes))
    _assert_trees_close(outs["none"], outs["all"], rtol=1e-6)


@pytest.mark.parametrize("build", [lambda v: ModelConfig(remat=v), lambda v: ModelConfig.from_dict({"remat": v})])
def test_bad_remat_value_is_a_one_line_error(build):
    with pytest.raises(ValueError) as e:
        build("stage")
    assert str(e.value) == "model.remat='stage': must be one of ('none', 'backbone', 'all')"
    cfg = ModelConfig(remat="backbone")
    assert cfg.remats("resnet") and not cfg.remats("fpn")
