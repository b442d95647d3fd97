"""The Mask R-CNN branch: pooling the detected boxes, mask head, predictor, the label's channel, sigmoid.

    mask_probabilities(pooler, head, predictor, features, boxes, labels, valid, canvas_hw)
                                                   -> [B, D, M, M] probabilities (inference)
    MaskRCNNHeads      FPN head `roi_heads/mask_head/{i}/0`: 3x3 conv + ReLU per entry of conv_channels
    MaskRCNNPredictor  `roi_heads/mask_predictor/{conv5_mask, mask_fcn_logits}`: 2x2 stride-2
                       transposed conv + ReLU, 1x1 conv to K logits
    select_label_masks the predicted label's channel of the logits -> sigmoid

The C4 model has no `mask_head` parameters: its head is the box head's res5
(`roi_heads/box_head/layer4`, the same parameters; `architectures.py` wires it). The
branch's training targets and loss belong in this file too.

Shapes: B images, D detections per image, R = B * D pooled boxes, S pooler resolution,
M mask resolution (FPN 2S = 28, C4 S = 14), K classes including background.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.modeling.conv import Conv

# torchvision's MaskRCNNHeads / MaskRCNNPredictor init: kaiming_normal_(mode="fan_out", relu), zero bias.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_transpose_2x2(x, kernel, bias):
    """torch's ConvTranspose2d(kernel 2, stride 2, padding 0): every input cell writes its own 2x2 block.

    Args:
      x: [R, H, W, Cin]; kernel: [2, 2, Cin, Cout] (torch weight [Cin, Cout, 2, 2] transposed
        (2, 3, 0, 1) by the converter); bias: [Cout].
    Returns:
      [R, 2H, 2W, Cout], out[2y + a, 2x + b] = sum_c x[y, x, c] kernel[a, b, c] + bias.
    """
    r, h, w, _ = x.shape
    y = jnp.einsum("rhwc,abcd->rhawbd", x, kernel)
    return y.reshape(r, 2 * h, 2 * w, kernel.shape[-1]) + bias


class ConvTranspose2x2(nn.Module):
    """`conv_transpose_2x2` with parameters `kernel` [2, 2, Cin, Cout] and `bias` [Cout]."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        # torch computes a ConvTranspose weight's fan_out from its dim 0 (Cin) x 2 x 2.
        init = nn.initializers.variance_scaling(2.0, "fan_in", "normal", in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param("kernel", init, (2, 2, x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return conv_transpose_2x2(x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype))


class _ConvReLU(nn.Module):
    """torchvision's `Conv2dNormActivation(norm_layer=None)`: the conv is its entry `0`."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = Conv(self.features, 3, dtype=self.dtype, kernel_init=KAIMING_FAN_OUT, name="0")
        return nn.relu(conv(x))


class MaskRCNNHeads(nn.Module):
    """torchvision's FPN mask head: [R, S, S, C] -> [R, S, S, conv_channels[-1]] (3x3 convs + ReLU)."""

    conv_channels: tuple[int, ...] = (256, 256, 256, 256)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for i, c in enumerate(self.conv_channels):
            x = _ConvReLU(c, dtype=self.dtype, name=str(i))(x)
        return x


class MaskRCNNPredictor(nn.Module):
    """[R, s, s, C] -> mask logits [R, 2s, 2s, num_classes] float32 (conv5_mask + ReLU, mask_fcn_logits)."""

    num_classes: int
    channels: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(ConvTranspose2x2(self.channels, dtype=self.dtype, name="conv5_mask")(x))
        logits = Conv(self.num_classes, 1, dtype=self.dtype, kernel_init=KAIMING_FAN_OUT, name="mask_fcn_logits")
        return logits(x).astype(jnp.float32)


def select_label_masks(mask_logits, labels):
    """torchvision `maskrcnn_inference`: the sigmoid of each box's label channel.

    Args:
      mask_logits: [R, M, M, K] float; labels: [R] int32 in [0, K).
    Returns:
      [R, M, M] float32 probabilities.
    """
    picked = jnp.take_along_axis(mask_logits, labels[:, None, None, None], axis=-1)[..., 0]
    return jax.nn.sigmoid(picked.astype(jnp.float32))


def mask_probabilities(
    pooler: Callable,
    head: Callable,
    predictor: Callable,
    features,
    boxes,
    labels,
    valid,
    canvas_hw: tuple[int, int],
):
    """The mask branch's inference path for the final detections of a batch.

    Args:
      pooler: (features, boxes [B, D, 4], canvas_hw) -> [B * D, S, S, C] (`poolers.RoIPooler`).
      head: [R, S, S, C] -> [R, s, s, C'] (FPN `MaskRCNNHeads`; C4 the box head's res5).
      predictor: [R, s, s, C'] -> [R, M, M, K] logits (`MaskRCNNPredictor`).
      features: the backbone's NHWC maps (RPN levels).
      boxes: [B, D, 4] float32 detections in canvas pixels; labels [B, D] int32; valid [B, D] bool.
      canvas_hw: static (H, W) of the padded canvas.
    Returns:
      masks [B, D, M, M] float32: sigmoid of each detection's label channel; 0 in invalid rows.
    """
    b, d, _ = boxes.shape
    logits = predictor(head(pooler(features, boxes, canvas_hw)))
    probs = select_label_masks(logits, labels.reshape(b * d).astype(jnp.int32))
    probs = probs.reshape(b, d, *probs.shape[1:])
    return jnp.where(valid[:, :, None, None], probs, 0.0)
