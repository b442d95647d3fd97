"""Feature Pyramid Network as torchvision builds it for `fasterrcnn_resnet50_fpn` (v1)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.modeling.conv import Conv
from frcnn_jax.modeling.resnet import maybe_remat_call


def upsample_nearest(x, out_hw: tuple[int, int]):
    """torch `F.interpolate(mode="nearest")` to a static size: src = floor(dst * in / out).

    x: [N, H, W, C] -> [N, out_h, out_w, C].
    """
    _, h, w, _ = x.shape
    ys = np.minimum(np.floor(np.arange(out_hw[0], dtype=np.float32) * np.float32(h / out_hw[0])), h - 1)
    xs = np.minimum(np.floor(np.arange(out_hw[1], dtype=np.float32) * np.float32(w / out_hw[1])), w - 1)
    ys, xs = ys.astype(np.int32), xs.astype(np.int32)
    ry, rx = out_hw[0] // h, out_hw[1] // w
    if (
        ry >= 1
        and rx >= 1
        and np.array_equal(ys, np.arange(out_hw[0]) // ry)
        and np.array_equal(xs, np.arange(out_hw[1]) // rx)
    ):
        # Integer factors (every FPN level on a canvas that is a multiple of 32): a
        # broadcast, whose gradient is a sum rather than a scatter-add of the gather.
        n, _, _, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, ry, w, rx, c))
        return x.reshape(n, h * ry, w * rx, c)
    return jnp.take(jnp.take(x, ys, axis=1), xs, axis=2)


class FPN(nn.Module):
    """Laterals (1x1) + top-down nearest upsampling + 3x3 outputs, then P6 = P5[::2, ::2].

    Input: [C2, C3, C4, C5] NHWC maps. Output: [P2, P3, P4, P5, P6], `channels` each.

    `remat`: every conv is a `resnet.remat_call`. A conv's backward needs only its
    input, which is kept either way, so nothing is recomputed (XLA drops the unused
    forward re-run); but the backward's copies of that input (the 9 tap copies of the
    P2 3x3 conv's CPU kernel gradient in `conv.py`, 9 x [256, N*H*W] floats, and the
    transposes of the 1x1 kernel gradients) can no longer be moved into the forward
    pass, where XLA's CPU scheduler otherwise puts them and they stay live until used.
    """

    channels: int = 256
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering

    @nn.compact
    def __call__(self, xs: Sequence[jax.Array]):
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # kaiming_uniform_(a=1)
        conv = functools.partial(Conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels, kernel_init=init)
        inner = [conv(self.channels, 1, name=f"inner_blocks_{i}") for i in range(len(xs))]
        layer = [conv(self.channels, 3, name=f"layer_blocks_{i}") for i in range(len(xs))]
        call = functools.partial(maybe_remat_call, remat=self.remat)
        last = call(inner[-1], xs[-1])
        results = [call(layer[-1], last)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = call(inner[i], xs[i])
            last = lateral + upsample_nearest(last, lateral.shape[1:3])
            results.insert(0, call(layer[i], last))
        results.append(results[-1][:, ::2, ::2, :])  # torchvision LastLevelMaxPool: max_pool2d(k=1, s=2)
        return results
