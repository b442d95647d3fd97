"""2-D convolution (NHWC, HWIO kernels) with a choice of XLA lowering.

XLA's CPU convolution is slow in two places that Faster R-CNN hits hard, so on CPU
`conv2d(impl="auto")` routes around them (measured on a 2-core AVX-512 machine, see
`tests/test_conv.py` for the equivalence checks):

* 1x1 kernels, and k x k kernels on batches of small maps (the C4 box head runs
  `layer4` on 1000 ROIs of 14x14): XLA's convolution is up to 2x slower than a plain
  matrix product. These are computed as a sum of k*k shifted matrix products (one for
  1x1), which XLA maps onto its fast GEMM.
* The kernel gradient of a k x k convolution over a large input with >= 128 channels
  (FPN's P2 level: 3x3, 256 channels on 2x200x272 takes 6-8 s in XLA against 1.3 s as
  shifted matrix products; 1x200x272x512: 11 s against 2 s). Such convolutions keep
  XLA's forward and input gradient and compute the kernel gradient as one matrix
  product per kernel tap.

The choice is made per platform at lowering time, not at trace time: `auto` stages the
CPU lowering and `lax.conv_general_dilated` side by side with `jax.lax.platform_dependent`
(CPU branch: the tuned path; every other platform: XLA's convolution), and the
lowering keeps only the branch of each platform it lowers for. A program lowered for
CPU alone holds only the CPU path, one lowered for cuda / tpu only XLA's convolution,
and a multi-platform artifact (`jax.export` with several platforms) both, picked when
the module is compiled on its device. Differentiation goes through the conditional,
so the backward pass (the custom kernel gradient included) is platform-dependent in
the same way. All lowerings give the same result up to float rounding.

Which CPU lowering is fastest depends on the kernels XLA:CPU compiles the program with
(`cpu_kernels`, a model setting; `cpu_kernels.compiler_options` gives the matching
`jax.jit(..., compiler_options=...)`). Measured on a 2-core AVX-512 + AMX Xeon, jax 0.12.1,
forward and backward:

* "default": the rules above.
* "ynnpack_dots" (convolutions on XLA's own kernels, 2.5-3x faster than YNNPACK's here:
  a 3x3 conv, 256 channels, 1x200x272 2.2 -> 0.80 s, 2x50x68 257 -> 89 ms):
  XLA's convolution is then the fastest lowering for large maps (on P2
  0.80 s against 1.37 s with the matrix-product kernel gradient), so only 1x1 kernels
  and k x k kernels on batches of small maps stay matrix products. On those small maps
  XLA's convolution would be faster still (the mask head's four 3x3 convs on 64 ROIs of
  14x14: 1.0 s as matrix products, 0.66 s as XLA's convolution), but they run inside the
  Mask R-CNN training step's bucket switch (`MaskHeadConfig.train_buckets`), and XLA:CPU
  runs a convolution inside a conditional's branch through a generic loop, about 100x
  slower (171 s against 1.8 s for those four convs under "default").
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.modeling.cpu_kernels import CPU_KERNELS

IMPLS = ("auto", "xla", "dot")

# Inputs with at least this many elements (N*H*W*Cin) and >= 128 channels get the
# matrix-product kernel gradient on CPU (cpu_kernels "default").
_DOT_KERNEL_GRAD_MIN_ELEMENTS = 2**23


def _use_dots(x_shape, kernel_shape, stride: int) -> bool:
    """Whether the CPU lowering computes this convolution as shifted matrix products (static shapes)."""
    kh, kw, cin, _ = kernel_shape
    if kh == kw == 1:
        return True
    out_h, out_w = -(-x_shape[1] // stride), -(-x_shape[2] // stride)
    return out_h * out_w <= 256 and cin >= 128


def _use_dot_kernel_grad(x_shape) -> bool:
    """Whether the CPU lowering takes the matrix-product kernel gradient for input shape `x_shape`.

    A symbolic batch dimension (`jax.export` shape polymorphism) counts as 1, its lower bound.
    """
    n, h, w, cin = x_shape
    n = n if isinstance(n, int) else 1
    return cin >= 128 and n * h * w * cin >= _DOT_KERNEL_GRAD_MIN_ELEMENTS


def _xla_conv(x, kernel, stride: int, padding: int):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # fmt: skip


def _taps(x, kh: int, kw: int, stride: int, padding: int):
    """Yield (dy, dx, x window [N, H', W', Cin]) for each kernel tap of a padded input."""
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    for dy in range(kh):
        for dx in range(kw):
            yield (
                dy,
                dx,
                x[:, dy : dy + stride * (out_h - 1) + 1 : stride, dx : dx + stride * (out_w - 1) + 1 : stride, :],
            )


def _dot_conv(x, kernel, stride: int, padding: int):
    kh, kw = kernel.shape[:2]
    out = None
    for dy, dx, tap in _taps(x, kh, kw, stride, padding):
        y = jnp.einsum("nhwc,cd->nhwd", tap, kernel[dy, dx])
        out = y if out is None else out + y
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_dot_kernel_grad(x, kernel, stride: int, padding: int):
    return _xla_conv(x, kernel, stride, padding)


def _xla_conv_fwd(x, kernel, stride, padding):
    return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _xla_conv_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    transpose = jax.linear_transpose(lambda x_: _xla_conv(x_, kernel, stride, padding), x)
    (dx,) = transpose(g)
    kh, kw = kernel.shape[:2]
    # _taps yields the taps in row-major (dy, dx) order: one [Cin, Cout] product each.
    dkernel = jnp.stack([jnp.einsum("nhwc,nhwd->cd", tap, g) for _, _, tap in _taps(x, kh, kw, stride, padding)])
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype)


_xla_conv_dot_kernel_grad.defvjp(_xla_conv_fwd, _xla_conv_bwd)


def conv2d(x, kernel, stride: int = 1, padding: int = 0, impl: str = "auto", cpu_kernels: str = "default"):
    """Convolution with torch-style symmetric zero padding.

    Args:
      x: [N, H, W, Cin] float32 or bfloat16.
      kernel: [kh, kw, Cin, Cout], same dtype as `x`.
      stride, padding: ints, the same in both spatial dimensions.
      impl: "auto" (per platform at lowering time: on CPU the fastest lowering for
        the shapes and `cpu_kernels`, elsewhere `lax.conv_general_dilated`), "xla"
        (`lax.conv_general_dilated` everywhere) or "dot" (sum of shifted matrix
        products everywhere).
      cpu_kernels: the XLA:CPU kernel library the program is compiled with ("default" or
        "ynnpack_dots", `modeling/cpu_kernels.py`); it picks `impl="auto"`'s CPU lowering.

    Returns:
      [N, (H + 2p - kh) // stride + 1, (W + 2p - kw) // stride + 1, Cout], dtype of `x`.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if cpu_kernels not in CPU_KERNELS:
        raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {cpu_kernels!r}")
    if impl == "dot":
        return _dot_conv(x, kernel, stride, padding)
    cpu = _cpu_lowering(x.shape, kernel.shape, stride, cpu_kernels) if impl == "auto" else None
    if cpu is None:
        return _xla_conv(x, kernel, stride, padding)
    return jax.lax.platform_dependent(
        x, kernel,
        cpu=lambda x_, k_: cpu(x_, k_, stride, padding),
        default=lambda x_, k_: _xla_conv(x_, k_, stride, padding),
    )  # fmt: skip


def _cpu_lowering(x_shape, kernel_shape, stride: int, cpu_kernels: str = "default"):
    """The CPU-tuned `f(x, kernel, stride, padding)` for these static shapes, or None (XLA's conv is best)."""
    if _use_dots(x_shape, kernel_shape, stride):
        return _dot_conv
    if cpu_kernels == "ynnpack_dots":
        return None
    if _use_dot_kernel_grad(x_shape):
        return _xla_conv_dot_kernel_grad
    return None


class Conv(nn.Module):
    """Square conv with torch-style padding; parameters `kernel` [k, k, Cin, Cout] (HWIO) and optional `bias`."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | None = None  # default kernel_size // 2
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    impl: str = "auto"
    cpu_kernels: str = "default"  # XLA:CPU's kernels (`modeling/cpu_kernels.py`); picks impl="auto"'s CPU lowering

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), jnp.float32)
        pad = k // 2 if self.padding is None else self.padding
        y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.impl, self.cpu_kernels)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
        return y
