"""`ModelConfig.cpu_kernels`: XLA:CPU's kernels for the model's programs ("default" or
"ynnpack_dots", `modeling/cpu_kernels.py`). Each setting picks the conv lowering its
kernels run fastest (`conv._cpu_lowering`); every jit of the model compiles with the
setting's options, and the results are the default's up to float rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.modeling import conv as conv_lib
from frcnn_jax.modeling import cpu_kernels as cpu_kernels_lib
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables, loss_names
from frcnn_jax.training import host_memory
from frcnn_jax.training.optim import OptimConfig
from frcnn_jax.training.train_step import create_train_state, make_train_step
from test_mask_training import FPN, mask_batch

YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}


def test_compiler_options_per_setting_and_merged_with_the_scheduler():
    assert jax.default_backend() == "cpu"
    assert cpu_kernels_lib.compiler_options("default") == {}
    assert cpu_kernels_lib.compiler_options("ynnpack_dots") == YNN_DOTS
    assert host_memory.step_compiler_options("default", "default") is None
    assert host_memory.step_compiler_options("memory", "ynnpack_dots") == {
        **host_memory.CPU_SCHEDULERS["memory"], **YNN_DOTS,
    }  # fmt: skip
    with pytest.raises(ValueError, match="cpu_kernels"):
        cpu_kernels_lib.compiler_options("eigen")
    with pytest.raises(ValueError, match=r"model.cpu_kernels='eigen': must be one of \('default', 'ynnpack_dots'\)"):
        ModelConfig(cpu_kernels="eigen")


def _lowering(x_shape, kernel_shape, cpu_kernels):
    f = conv_lib._cpu_lowering(x_shape, kernel_shape, 1, cpu_kernels)
    return None if f is None else f.__name__


def test_each_setting_picks_its_lowering():
    p2, kernel3, kernel1 = (2, 200, 272, 256), (3, 3, 256, 256), (1, 1, 256, 256)
    rois = (128, 14, 14, 256)  # the mask head's maps: run inside the training step's bucket switch
    assert _lowering(p2, kernel3, "default") == "_xla_conv_dot_kernel_grad"
    assert _lowering(p2, kernel3, "ynnpack_dots") is None  # XLA's convolution, forward and backward
    # XLA's convolution forward; backward the matrix products' gradients ("default", strided),
    # or convolutions in the form XLA's kernels take inside the switch's branches too
    assert _lowering(rois, kernel3, "default") == "_xla_conv_dot_grads"
    assert _lowering(rois, kernel3, "ynnpack_dots") == "_xla_conv_canonical_grads"
    assert conv_lib._cpu_lowering(rois, kernel3, 2, "ynnpack_dots").__name__ == "_xla_conv_dot_grads"
    assert _lowering(p2, kernel1, "default") == "_dot_conv_sum"
    assert _lowering(p2, kernel1, "ynnpack_dots") == "_dot_conv"  # keeps only its input for the backward pass


@pytest.mark.parametrize(("shape", "k"), [((2, 24, 20, 128), 3), ((2, 24, 20, 16), 1), ((8, 7, 7, 128), 3)])
def test_ynnpack_dots_conv_agrees_with_the_default(shape, k):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, shape[-1], 32)) / np.sqrt(k * k * shape[-1]), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((*shape[:3], 32)), jnp.float32)
    out = {}
    for kernels in cpu_kernels_lib.CPU_KERNELS:

        def loss(a, b, kernels=kernels):
            y = conv_lib.conv2d(a, b, 1, k // 2, cpu_kernels=kernels)
            return jnp.vdot(y, cot), y

        fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        options = cpu_kernels_lib.compiler_options(kernels) or None
        (_, y), grads = jax.jit(fn, compiler_options=options)(x, kernel)
        out[kernels] = (y, *grads)
    for a, b in zip(out["default"], out["ynnpack_dots"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_ynnpack_dots_mask_model_trains_as_the_default():
    """A tiny FPN Mask R-CNN, one training step compiled with the loop's options: its forward
    (inference's convolutions and more) and backward under both settings."""
    batch = mask_batch(b=2, seed=3)
    ocfg = OptimConfig(base_lr=0.01, warmup_steps=1, decay_steps=(50,), total_steps=100)
    results = {}
    for kernels in cpu_kernels_lib.CPU_KERNELS:
        model = FasterRCNN(ModelConfig.from_dict({**FPN, "cpu_kernels": kernels}))
        variables = init_variables(model, jax.random.key(0))
        state, tx = create_train_state(model, variables, ocfg, seed=0)
        options = host_memory.step_compiler_options("default", kernels)
        assert (options is not None) == (kernels != "default")
        state, metrics = jax.jit(make_train_step(model, tx), compiler_options=options)(state, batch)
        results[kernels] = metrics, state.params
    (m0, p0), (m1, p1) = results["default"], results["ynnpack_dots"]
    for name in loss_names(model.cfg):
        np.testing.assert_allclose(float(m1[name]), float(m0[name]), rtol=1e-4, err_msg=name)
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_detector_and_predict_take_the_setting(capsys):
    from frcnn_jax import predict
    from frcnn_jax.detector import Detector

    cfg = ModelConfig.from_dict(FPN)
    variables = init_variables(FasterRCNN(cfg), jax.random.key(0))
    assert Detector(cfg, variables).model_config.cpu_kernels == "default"
    assert Detector(cfg, variables, cpu_kernels="ynnpack_dots").model_config.cpu_kernels == "ynnpack_dots"
    with pytest.raises(ValueError, match=r"model.cpu_kernels='eigen': must be one of"):
        Detector(cfg, variables, cpu_kernels="eigen")
    with pytest.raises(SystemExit):
        predict.main(["x.jpg", "--checkpoint", "c", "--out", "o", "--cpu-kernels", "eigen"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "--cpu-kernels: invalid choice: 'eigen'" in err[-1]
