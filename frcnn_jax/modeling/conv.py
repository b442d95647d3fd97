"""2-D convolution (NHWC, HWIO kernels) with a choice of XLA lowering.

XLA's CPU convolution is slow in three places that Faster R-CNN hits hard, so on CPU
`conv2d(impl="auto")` routes around them (`tests/test_conv.py` checks that every lowering
gives the same values and gradients):

* 1x1 kernels: computed as one matrix product, which XLA maps onto its fast GEMM (up to
  2x faster than its convolution).
* k x k kernels on batches of small maps (the mask head's 3x3 convs on ROIs of 14x14, the
  C4 box head's `layer4` on 1000 ROIs): XLA's forward convolution is the fastest there
  (AMD EPYC, jax 0.12.1: [100, 14, 14, 256] 59 ms against 120 ms as 9 shifted matrix
  products; [1000, 7, 7, 512] 683 against 918 ms), but JAX's gradients of it become
  generic loops inside a conditional's branch (the Mask R-CNN step's bucket switch,
  `MaskHeadConfig.train_buckets`: ~300x slower). Their gradients are therefore written
  by hand: as the shifted matrix products' (`_xla_conv_dot_grads`), or under
  "ynnpack_dots" for stride 1 as convolutions in the layout XLA's kernels take
  (`_xla_conv_canonical_grads`). Either keeps only the input and the kernel for the
  backward pass, not the k*k taps differentiating the products as written would keep.
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
* "ynnpack_dots" (convolutions on XLA's own kernels, 2.5-3x faster than YNNPACK's there:
  a 3x3 conv, 256 channels, 1x200x272 2.2 -> 0.80 s, 2x50x68 257 -> 89 ms):
  XLA's convolution is then the fastest lowering for large maps, gradients included (on
  P2 0.80 s against 1.37 s with the matrix-product kernel gradient), and the stride-1
  small-map convolutions take `_xla_conv_canonical_grads` (the mask head's four 3x3 convs
  on 64 ROIs of 14x14, forward and backward inside the switch: 0.59 s, against 1.3 s as
  matrix products and 173 s with JAX's gradients). 1x1 kernels stay matrix products
  (`_dot_conv`, whose gradient keeps only its input).

With `impl="dot"` the convolution is the shifted matrix products everywhere (`_dot_conv`).
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


def _is_small_map(x_shape, kernel_shape, stride: int) -> bool:
    """Whether a k x k convolution runs on a batch of small maps (<= 256 outputs, >= 128 channels)."""
    cin = kernel_shape[2]
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


def _dot_conv_sum(x, kernel, stride: int, padding: int):
    kh, kw = kernel.shape[:2]
    out = None
    for dy, dx, tap in _taps(x, kh, kw, stride, padding):
        y = jnp.einsum("nhwc,cd->nhwd", tap, kernel[dy, dx])
        out = y if out is None else out + y
    return out


def _tap_kernel_grad(x, g, kernel_shape, stride: int, padding: int):
    """The kernel gradient [kh, kw, Cin, Cout] of a convolution as one [Cin, Cout] matrix product per tap."""
    kh, kw = kernel_shape[:2]
    # _taps yields the taps in row-major (dy, dx) order.
    dkernel = jnp.stack([jnp.einsum("nhwc,nhwd->cd", tap, g) for _, _, tap in _taps(x, kh, kw, stride, padding)])
    return dkernel.reshape(kernel_shape)


def _tap_kernel_grad_rules(forward, transpose=None):
    """custom_vjp (fwd, bwd) rules for a convolution `forward(x, kernel, stride, padding)`:
    the residuals are `x` and `kernel` only; dx is the transpose of `transpose` (another
    lowering of the same convolution; default `forward`), dk one matrix product per kernel
    tap (`_tap_kernel_grad`)."""
    transpose = transpose or forward

    def fwd(x, kernel, stride, padding):
        return forward(x, kernel, stride, padding), (x, kernel)

    def bwd(stride, padding, residuals, g):
        x, kernel = residuals
        (dx,) = jax.linear_transpose(lambda x_: transpose(x_, kernel, stride, padding), x)(g)
        return dx, _tap_kernel_grad(x, g, kernel.shape, stride, padding).astype(kernel.dtype)

    return fwd, bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot_conv(x, kernel, stride: int, padding: int):
    """The convolution as a sum of k*k shifted matrix products.

    Its gradient keeps only `x` and `kernel` for the backward pass and slices the taps
    again there: differentiated as written, each of the k*k taps of `x` would be kept,
    materialised, until the backward pass (k*k = 9 copies of the input of every 3x3
    convolution: 1.5 GB for the mask head of a Mask R-CNN training step).
    """
    return _dot_conv_sum(x, kernel, stride, padding)


_dot_conv.defvjp(*_tap_kernel_grad_rules(_dot_conv_sum))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_dot_grads(x, kernel, stride: int, padding: int):
    """XLA's convolution forward, `_dot_conv`'s gradients backward (its matrix products).

    For k x k kernels on batches of small maps: XLA's forward convolution is about 2x
    faster than the shifted products there, while the products' gradients run as fast in
    the Mask R-CNN step's bucket switch as outside it (JAX's gradients of XLA's
    convolution do not, under the default kernels as under "ynnpack_dots").
    """
    return _xla_conv(x, kernel, stride, padding)


_xla_conv_dot_grads.defvjp(*_tap_kernel_grad_rules(_xla_conv, transpose=_dot_conv_sum))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_dot_kernel_grad(x, kernel, stride: int, padding: int):
    return _xla_conv(x, kernel, stride, padding)


_xla_conv_dot_kernel_grad.defvjp(*_tap_kernel_grad_rules(_xla_conv))


def _kernel_grad_conv(x, g, kernel_shape, padding: int):
    """The kernel gradient [kh, kw, Cin, Cout] of a stride-1 convolution as one NHWC / HWIO convolution.

    dk[a, b, i, o] = sum_{n, h, w} x_padded[n, h + a, w + b, i] g[n, h, w, o]: Cin taken as
    the batch, N as the contracted features and g as the kernel.
    """
    lhs = jnp.transpose(x, (3, 1, 2, 0))  # [Cin, H, W, N]
    rhs = jnp.transpose(g, (1, 2, 0, 3))  # [H', W', N, Cout]
    out = _xla_conv(lhs, rhs, 1, padding)  # [Cin, kh, kw, Cout]
    assert out.shape[1:3] == tuple(kernel_shape[:2]), (out.shape, kernel_shape)
    return jnp.transpose(out, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _xla_conv_canonical_grads(x, kernel, stride: int, padding: int):
    """XLA's stride-1 convolution whose two gradients are written as NHWC / HWIO convolutions too.

    Differentiated by JAX, the gradients are convolutions with other dimension orders,
    which XLA:CPU's layout passes bring to a form its convolution kernels take, except
    inside a conditional's branch (the Mask R-CNN step's bucket switch): there they run as
    generic loops, about 300x slower. Written in that form they run as fast in a branch as
    outside it (`tests/test_conv.py`).
    """
    return _xla_conv(x, kernel, stride, padding)


def _canonical_fwd(x, kernel, stride, padding):
    return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _canonical_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    kh = kernel.shape[0]
    dx = _xla_conv(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), 1, kh - 1 - padding)
    return dx, _kernel_grad_conv(x, g, kernel.shape, padding).astype(kernel.dtype)


_xla_conv_canonical_grads.defvjp(_canonical_fwd, _canonical_bwd)


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
    kh, kw = kernel_shape[:2]
    ynnpack_dots = cpu_kernels == "ynnpack_dots"
    if kh == kw == 1:  # one matrix product ("default": JAX's gradient of it keeps only x, as _dot_conv's)
        return _dot_conv if ynnpack_dots else _dot_conv_sum
    if _is_small_map(x_shape, kernel_shape, stride):  # XLA's forward, hand-written gradients
        return _xla_conv_canonical_grads if ynnpack_dots and stride == 1 else _xla_conv_dot_grads
    if not ynnpack_dots and _use_dot_kernel_grad(x_shape):
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
