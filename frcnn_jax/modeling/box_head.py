"""Box heads (C4 res5 head, FPN two-MLP head) and the class/box predictor; composed in `roi_heads.RoIHeads`."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from frcnn_jax.modeling.resnet import RESNET_SPECS, ResNetStage, maybe_remat_call


class Res5Head(nn.Module):
    """The C4 box head: ResNet stage 4 (`layer4`, first block stride 2) + average pool.

    [R, S, S, C] pooled ROI features -> [R, C_out] (ResNet-50: [R, 14, 14, 1024] ->
    layer4 [R, 7, 7, 2048] -> mean over the 7x7 cells -> [R, 2048]).

    `remat`: each layer4 block is a `resnet.remat_call` (keeps its input, recomputes
    the rest in the backward pass; see `ResNetStage`).
    """

    depth: int = 50
    width: int = 64
    stride_in_1x1: bool = False
    bn_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    zero_init_residual: bool = False
    remat: bool = False
    cpu_kernels: str = "default"  # XLA:CPU's kernels (modeling/cpu_kernels.py): picks conv.Conv's CPU lowering

    def setup(self):
        blocks = RESNET_SPECS[self.depth][1]
        self.layer4 = ResNetStage(
            self.depth,
            self.width * 8,
            blocks[3],
            stride=2,
            stride_in_1x1=self.stride_in_1x1,
            bn_eps=self.bn_eps,
            dtype=self.dtype,
            zero_init_residual=self.zero_init_residual,
            remat=self.remat,
            cpu_kernels=self.cpu_kernels,
        )

    def features(self, x):
        """[R, S, S, C] -> layer4's map [R, S/2, S/2, C_out] in the compute dtype (the C4 mask head shares it)."""
        return self.layer4(x.astype(self.dtype))

    def __call__(self, x):
        return jnp.mean(self.features(x).astype(jnp.float32), axis=(1, 2))


class TwoMLPHead(nn.Module):
    """torchvision's FPN box head: flatten -> fc6 -> relu -> fc7 -> relu.

    [R, 7, 7, C] -> [R, representation_size]. The flatten order is NHWC (y, x, c); the
    checkpoint converter permutes torchvision's (c, y, x) fc6 columns to match.

    `remat`: fc6 and fc7 are `resnet.remat_call`s. Nothing is recomputed (a layer's
    backward needs only its input, kept either way); the backward's work on the
    [R, 7*7*C] input stays in the backward pass.
    """

    representation_size: int = 1024
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for name in ("fc6", "fc7"):
            fc = nn.Dense(self.representation_size, dtype=self.dtype, name=name)
            x = nn.relu(maybe_remat_call(fc, x, remat=self.remat))
        return x.astype(jnp.float32)


class FastRCNNPredictor(nn.Module):
    """[R, D] -> class logits [R, num_classes], class-specific deltas [R, num_classes, 4]."""

    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # maskrcnn-benchmark / Detectron init: N(0, 0.01) scores, N(0, 0.001) deltas, zero biases.
        cls = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.01), name="cls_score")
        box = nn.Dense(
            4 * self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.normal(0.001), name="bbox_pred"
        )
        x = x.astype(self.dtype)
        logits = cls(x).astype(jnp.float32)
        deltas = box(x).astype(jnp.float32).reshape(x.shape[0], self.num_classes, 4)
        return logits, deltas
