"""The conv2d lowerings (XLA, shifted matrix products, XLA with a matrix-product kernel
gradient) agree in value and in both gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.modeling import conv as conv_lib
from frcnn_jax.modeling import cpu_kernels as cpu_kernels_lib


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


@pytest.mark.parametrize(
    "k,stride,padding", [(3, 1, 1), (3, 1, 0), (3, 1, 2), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)]
)
def test_lowerings_agree_in_value_and_gradients(k, stride, padding):
    x, kernel = _inputs(2, 13, 17, 8, 6, k)
    results = {
        "xla": _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, padding, "xla"), x, kernel),
        "dot": _value_and_grads(lambda a, b: conv_lib.conv2d(a, b, stride, padding, "dot"), x, kernel),
        "xla+dot kernel grad": _value_and_grads(
            lambda a, b: conv_lib._xla_conv_dot_kernel_grad(a, b, stride, padding), x, kernel
        ),
        "xla+dot grads": _value_and_grads(lambda a, b: conv_lib._xla_conv_dot_grads(a, b, stride, padding), x, kernel),
    }
    if stride == 1:
        results["xla, canonical gradients"] = _value_and_grads(
            lambda a, b: conv_lib._xla_conv_canonical_grads(a, b, stride, padding), x, kernel
        )
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


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
@pytest.mark.parametrize("lowering", ["dot", "xla+dot grads"])
def test_matrix_product_gradients_keep_only_the_input_for_the_backward_pass(k, stride, padding, lowering):
    # Differentiated as written, the shifted matrix products would keep all k*k taps of
    # the input (9 copies for a 3x3 conv: the Mask R-CNN step's mask head held 1.5 GB).
    x, kernel = _inputs(2, 14, 14, 16, 8, k)
    conv = {
        "dot": lambda a, b: conv_lib.conv2d(a, b, stride, padding, "dot"),
        "xla+dot grads": lambda a, b: conv_lib._xla_conv_dot_grads(a, b, stride, padding),
    }[lowering]
    _, vjp = jax.vjp(conv, x, kernel)
    kept = sum(leaf.nbytes for leaf in jax.tree.leaves(vjp))
    assert kept <= x.nbytes + kernel.nbytes


def _switched_grad_hlo(conv, options):
    """The compiled HLO (XLA:CPU `options`) of a conv's gradients inside a `lax.switch` branch."""
    x, kernel = _inputs(4, 14, 14, 32, 32, 3)

    def grads(a, b):
        return jax.grad(lambda a_, b_: jnp.sum(jax.nn.relu(conv(a_, b_)) ** 2), (0, 1))(a, b)

    def f(i, a, b):
        return jax.lax.switch(i, [grads, lambda a_, b_: grads(2 * a_, b_)], a, b)

    return jax.jit(f, compiler_options=options or None).lower(jnp.int32(0), x, kernel).compile().as_text()


@pytest.mark.parametrize(
    "cpu_kernels,lowering", [("ynnpack_dots", "_xla_conv_canonical_grads"), ("default", "_xla_conv_dot_grads")]
)
def test_small_map_gradients_stay_fast_kernels_inside_a_conditional(cpu_kernels, lowering):
    # Inside a conditional's branch XLA:CPU emits JAX's own convolution gradients as generic
    # loop fusions ("wrapped_convolution"): the Mask R-CNN step's mask head ran ~300x slower.
    # The small-map lowerings' gradients are convolutions in the form XLA's kernels take, or
    # matrix products.
    conv = getattr(conv_lib, lowering)
    hlo = _switched_grad_hlo(lambda a, b: conv(a, b, 1, 1), cpu_kernels_lib.compiler_options(cpu_kernels))
    assert "convolution(" in hlo and "wrapped_convolution" not in hlo


def test_bfloat16_matrix_product_gradients_keep_the_dtypes():
    x, kernel = _inputs(1, 9, 9, 8, 4, 3)
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    dx, dk = jax.grad(lambda a, b: conv_lib.conv2d(a, b, 1, 1, "dot").astype(jnp.float32).sum(), (0, 1))(x, kernel)
    assert dx.dtype == dk.dtype == jnp.bfloat16 and dk.shape == kernel.shape


def test_unknown_impl_is_rejected():
    x, kernel = _inputs(1, 5, 5, 2, 2, 3)
    with pytest.raises(ValueError, match="impl"):
        conv_lib.conv2d(x, kernel, impl="cudnn")


# --- platform-dependent lowering ----------------------------------------------------------
# conv.py's CPU path shows in StableHLO as dot_generals with no batch dimensions and an
# NHWC (rank-4) operand: one shifted-window tap times a kernel slice ("nhwc,cd->nhwd"), or
# a tap-by-tap kernel gradient ("nhwc,nhwd->cd"). XLA's path is `stablehlo.convolution`
# (forward and both gradients). Nothing else in the model lowers to such a dot_general
# (ROIAlign's contractions have batch dimensions, the dense layers are rank 2).
_DOT_GENERAL = re.compile(r"stablehlo\.dot_general\b[^\n]*")
_RANK4_OPERAND = re.compile(r":\s*\(tensor<(\d+x){4}")


def cpu_conv_dots(mlir_text: str) -> int:
    """Number of dot_generals of conv.py's CPU-only lowering in a StableHLO module's text."""
    return sum(
        1 for line in _DOT_GENERAL.findall(mlir_text) if "batching_dims" not in line and _RANK4_OPERAND.search(line)
    )


def _lowered_texts(fn, *args, platform_sets):
    traced = jax.jit(fn).trace(*args)
    return {ps: traced.lower(lowering_platforms=ps).as_text() for ps in platform_sets}


_PLATFORM_SETS = (("cpu",), ("cuda",), ("tpu",), ("cuda", "tpu"), ("cpu", "cuda", "tpu"))


@pytest.mark.parametrize(
    "case,shape,k,stride,padding",
    [
        ("1x1 as one matrix product", (2, 12, 10, 8), 1, 1, 0),
        ("3x3 on a small map, gradients as shifted products", (4, 8, 8, 128), 3, 1, 1),
        ("3x3 kernel gradient as per-tap products", (2, 20, 18, 128), 3, 1, 1),
    ],
)
def test_cpu_path_is_lowered_for_cpu_only(case, shape, k, stride, padding, monkeypatch):
    """Forward and both gradients: the CPU-tuned path for cpu, XLA's convolution for cuda / tpu."""
    monkeypatch.setattr(conv_lib, "_DOT_KERNEL_GRAD_MIN_ELEMENTS", 1)
    x, kernel = _inputs(*shape, 16, k)
    if "kernel gradient" in case:
        assert not conv_lib._is_small_map(x.shape, kernel.shape, stride) and conv_lib._use_dot_kernel_grad(x.shape)

    def fwd_and_grads(x, kernel):
        y, vjp = jax.vjp(lambda a, b: conv_lib.conv2d(a, b, stride, padding, "auto"), x, kernel)
        return y, vjp(jnp.ones_like(y))

    texts = _lowered_texts(fwd_and_grads, x, kernel, platform_sets=_PLATFORM_SETS)
    for ps in (("cuda",), ("tpu",), ("cuda", "tpu")):
        assert cpu_conv_dots(texts[ps]) == 0, f"{case}: CPU-only matrix products in the {ps} lowering"
        assert "stablehlo.convolution" in texts[ps]
    assert cpu_conv_dots(texts[("cpu",)]) > 0, f"{case}: the CPU lowering lost its tuned path"
    # one artifact for all three holds both paths (picked by the platform index at compile time)
    assert cpu_conv_dots(texts[("cpu", "cuda", "tpu")]) > 0 and "stablehlo.convolution" in texts[("cpu", "cuda", "tpu")]
    if "kernel gradient" in case:
        # the tuned path keeps XLA's forward and input gradient on CPU, only the kernel gradient is per-tap
        assert "stablehlo.convolution" in texts[("cpu",)]
        assert cpu_conv_dots(texts[("cpu",)]) == k * k  # one [Cin, Cout] product per kernel tap
    elif "small map" in case:
        # XLA's forward; both gradients as per-tap products (the input gradient's and the kernel's)
        assert texts[("cpu",)].count("stablehlo.convolution") == 1
        assert cpu_conv_dots(texts[("cpu",)]) == 2 * k * k
    else:
        assert "stablehlo.convolution" not in texts[("cpu",)]


def test_platform_choice_folds_away_in_a_cpu_compile(monkeypatch):
    """A CPU-only lowering keeps one branch: the compiled program has no conditional, and the
    same numbers as the CPU path called directly."""
    monkeypatch.setattr(conv_lib, "_DOT_KERNEL_GRAD_MIN_ELEMENTS", 1)
    x, kernel = _inputs(2, 20, 18, 128, 4, 3)

    def loss(a, b):
        return jnp.sum(conv_lib.conv2d(a, b, 1, 1, "auto") ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    lowered = grad.trace(x, kernel).lower(lowering_platforms=("cpu",))
    # Only the CPU branch is lowered: jax 0.11 keeps the choice as a one-branch stablehlo.case,
    # jax 0.12 resolves it while lowering; either way the CPU kernel gradient is what was lowered.
    text = lowered.as_text()
    assert cpu_conv_dots(text) > 0
    assert "conditional" not in lowered.compile().as_text()
    direct = jax.jit(
        jax.grad(lambda a, b: jnp.sum(conv_lib._xla_conv_dot_kernel_grad(a, b, 1, 1) ** 2), argnums=(0, 1))
    )
    for got, want in zip(grad(x, kernel), direct(x, kernel)):
        np.testing.assert_array_equal(got, want)


def test_xla_and_dot_impls_are_not_platform_dependent():
    x, kernel = _inputs(1, 8, 8, 8, 8, 1)
    for impl, want_dots in (("xla", False), ("dot", True)):
        traced = jax.jit(lambda a, b: conv_lib.conv2d(a, b, impl=impl)).trace(x, kernel)  # noqa: B023
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.case" not in text and (cpu_conv_dots(text) > 0) == want_dots, impl
