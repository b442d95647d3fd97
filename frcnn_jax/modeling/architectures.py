"""The one place that turns `ModelConfig.arch` into modules: backbone, poolers, box and mask heads.

As torchvision passes a backbone, poolers and heads into `FasterRCNN` / `MaskRCNN`, the
stages here receive an `Architecture` and never ask which one they are running: a new
backbone or head touches this file only.

    arch  backbone                         box pooler / head                mask pooler / head (when enabled)
    c4    ResNet stem + layer1-3 (1/16)    ROIAlign S on it / res5 + avgpool  ROIAlign 14 on it / the box head's
                                                                             res5 (shared) -> M = 14
    fpn   ResNet + FPN (P2-P6)             MultiScaleRoIAlign P2-P5 /        MultiScaleRoIAlign 14 P2-P5 /
                                           two-MLP head                     4 x conv 3x3 -> M = 28

Module factories are called inside the owning module's `setup`, so the parameters land
at the owner's attribute names (`backbone`, `roi_heads/box_head`, `roi_heads/mask_head`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn

from frcnn_jax.modeling.box_head import Res5Head, TwoMLPHead
from frcnn_jax.modeling.config import ModelConfig, compute_dtype
from frcnn_jax.modeling.fpn import FPN
from frcnn_jax.modeling.mask_head import MaskRCNNHeads
from frcnn_jax.modeling.poolers import RoIPooler
from frcnn_jax.modeling.resnet import ResNet


class TrunkBackbone(nn.Module):
    """ResNet stem + the first `num_stages` stages; returns [the last stage's map] (C4: layer3, stride 16)."""

    cfg: ModelConfig
    num_stages: int = 3

    @nn.compact
    def __call__(self, images):
        outs = _resnet(self.cfg, self.num_stages)(images)
        return [outs[f"layer{self.num_stages}"]]


class FPNBackbone(nn.Module):
    """ResNet (4 stages) + FPN -> [P2, ..., P6] (torchvision's resnet_fpn_backbone)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images):
        outs = _resnet(self.cfg, 4)(images)
        cfg = self.cfg
        fpn = FPN(
            cfg.backbone.fpn_channels,
            dtype=compute_dtype(cfg),
            remat=cfg.remats("fpn"),
            cpu_kernels=cfg.cpu_kernels,
            name="fpn",
        )
        return fpn([outs[f"layer{i}"] for i in range(1, 5)])


def _resnet(cfg: ModelConfig, num_stages: int) -> ResNet:
    bb = cfg.backbone
    return ResNet(
        depth=bb.depth,
        width=bb.width,
        num_stages=num_stages,
        stride_in_1x1=bb.stride_in_1x1,
        freeze_at=bb.freeze_at,
        bn_eps=bb.bn_eps,
        dtype=compute_dtype(cfg),
        zero_init_residual=bb.zero_init_residual,
        remat=cfg.remats("resnet"),
        cpu_kernels=cfg.cpu_kernels,
        name="body",
    )


@dataclasses.dataclass(frozen=True)
class Architecture:
    """What the stages are built from (module factories take no arguments; call them in `setup`).

    backbone: () -> module, images [B, H, W, 3] -> list of NHWC maps (the RPN levels).
    box_pooler / box_head: pooled [R, S, S, C] -> [R, F] box features.
    box_head_trunk_stages: trunk stages that live in the box head (C4: ("layer4",) at
      `roi_heads/box_head/layer4`), for ImageNet initialisation.
    mask_pooler / mask_head: the mask branch's pooler and head ([R, S, S, C] -> [R, s, s, C']);
      mask_head None: the head is the box head's `features` (its parameters, shared).
    mask_resolution: M of the predicted masks (M x M).
    """

    backbone: Callable[[], nn.Module]
    box_pooler: RoIPooler
    box_head: Callable[[], nn.Module]
    box_head_trunk_stages: tuple[str, ...]
    mask_pooler: RoIPooler
    mask_head: Callable[[], nn.Module] | None
    mask_resolution: int


def _pooler(num_levels: int, pooler) -> RoIPooler:
    return RoIPooler(num_levels, pooler.resolution, pooler.sampling_ratio, pooler.aligned)


def _c4(cfg: ModelConfig) -> Architecture:
    bb = cfg.backbone
    return Architecture(
        backbone=functools.partial(TrunkBackbone, cfg, 3),
        box_pooler=_pooler(1, cfg.roi_heads.pooler),
        box_head=functools.partial(
            Res5Head,
            bb.depth,
            bb.width,
            bb.stride_in_1x1,
            bb.bn_eps,
            dtype=compute_dtype(cfg),
            zero_init_residual=bb.zero_init_residual,
            remat=cfg.remats("box_head"),
            cpu_kernels=cfg.cpu_kernels,
        ),  # fmt: skip
        box_head_trunk_stages=("layer4",),
        mask_pooler=_pooler(1, cfg.mask.pooler),
        mask_head=None,  # res5, stride 2, then the predictor's 2x upsampling: M = S
        mask_resolution=cfg.mask.pooler.resolution,
    )


def _fpn(cfg: ModelConfig) -> Architecture:
    return Architecture(
        backbone=functools.partial(FPNBackbone, cfg),
        box_pooler=_pooler(4, cfg.roi_heads.pooler),
        box_head=functools.partial(
            TwoMLPHead, cfg.roi_heads.representation_size, dtype=compute_dtype(cfg), remat=cfg.remats("box_head")
        ),
        box_head_trunk_stages=(),
        mask_pooler=_pooler(4, cfg.mask.pooler),
        mask_head=functools.partial(
            MaskRCNNHeads, cfg.mask.conv_channels, dtype=compute_dtype(cfg), cpu_kernels=cfg.cpu_kernels
        ),
        mask_resolution=2 * cfg.mask.pooler.resolution,
    )


_ARCHITECTURES = {"c4": _c4, "fpn": _fpn}


def architecture(cfg: ModelConfig) -> Architecture:
    """The modules and poolers of `cfg.arch` (one of `config.ARCHS`)."""
    return _ARCHITECTURES[cfg.arch](cfg)
