"""The conv2d lowerings (XLA, shifted matrix products, XLA with a matrix-product kernel
gradient) agree in value and in both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.modeling import conv as conv_lib


def _inputs(n, h, w, cin, cout, k, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
    return x, kernel


def _value_and_grads(fn, x, kernel):
    rng = np.random.default_rng(1)
    cot = None

    def loss(x, kernel):
        y = fn(x, kernel)
        nonlocal cot
        if cot is None:
            cot = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        return jnp.vdot(y, cot), y

    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
    return y, grads


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)])
def test_lowerings_agree_in_value_and_gradients(k, stride, padding):
    x, kernel = _inputs(2, 13, 17, 8, 6, k)
    results = {
        "xla": _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, padding, "xla"), x, kernel),
        "dot": _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, padding, "dot"), x, kernel),
        "xla+dot kernel grad": _value_and_grads(
            lambda a, b: conv_lib._xla_conv_dot_kernel_grad(a, b, stride, padding), x, kernel
        ),
    }
    y_ref, (dx_ref, dk_ref) = results["xla"]
    assert y_ref.shape == (2, (13 + 2 * padding - k) // stride + 1, (17 + 2 * padding - k) // stride + 1, 6)
    for name, (y, (dx, dk)) in results.items():
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(dk, dk_ref, rtol=1e-5, atol=1e-4, err_msg=name)


def test_auto_picks_the_matrix_product_kernel_gradient_for_large_inputs_on_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert conv_lib._use_dot_kernel_grad((2, 200, 272, 256))
    assert not conv_lib._use_dot_kernel_grad((2, 200, 272, 64))
    assert not conv_lib._use_dot_kernel_grad((2, 50, 68, 256))
    # With the size threshold lowered, auto differentiates through the custom rule
    # and gets the same gradients as plain XLA.
    monkeypatch.setattr(conv_lib, "_DOT_KERNEL_GRAD_MIN_ELEMENTS", 1)
    x, kernel = _inputs(2, 20, 18, 128, 4, 3)  # 20*18 > 256: not the all-dots path
    auto_fn = lambda a, b: conv_lib.conv2d(a, b, 1, 1, "auto")  # noqa: E731
    assert "custom_vjp_call" in str(jax.make_jaxpr(auto_fn)(x, kernel))
    auto = _value_and_grads(auto_fn, x, kernel)
    xla = _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, 1, 1, "xla"), x, kernel)
    for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(xla)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_bfloat16_kernel_gradient_keeps_the_kernel_dtype():
    x, kernel = _inputs(1, 9, 9, 8, 4, 3)
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    dk = jax.grad(lambda b: conv_lib._xla_conv_dot_kernel_grad(x, b, 1, 1).astype(jnp.float32).sum())(kernel)
    assert dk.dtype == jnp.bfloat16 and dk.shape == kernel.shape


def test_unknown_impl_is_rejected():
    x, kernel = _inputs(1, 5, 5, 2, 2, 3)
    with pytest.raises(ValueError, match="impl"):
        conv_lib.conv2d(x, kernel, impl="cudnn")
