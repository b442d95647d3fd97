"""The detector's hyperparameters as one frozen, hashable dataclass.

`configs/*.py` hold them as an ml_collections `ConfigDict` under `config.model`;
`ModelConfig.from_dict` turns that into this dataclass once, at construction, and the
modules read plain values from it. Unknown or ill-typed fields fail loudly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

ARCHS = ("c4", "fpn")

# Training-time rematerialisation (`ModelConfig.remat`): which parts of the network are
# `resnet.remat_call`s, i.e. keep only their inputs for the backward pass and re-run
# their forward there (with the re-run tied to the incoming cotangent, so that XLA can
# neither merge it back into the forward pass nor schedule it early). Inference, the
# parameter tree, the losses and the gradients are the same for every setting.
#   "none":     nothing; XLA keeps every linearisation point of the forward pass.
#   "backbone": every trained ResNet residual block (trunk, and the C4 box head's
#               layer4) keeps only its input and recomputes its convolutions, batch
#               norms and relus in the backward pass: one more forward of the trained
#               stages, and per block one kept tensor instead of about four.
#   "all":      "backbone", plus every conv of the FPN and the RPN head, and the FPN
#               box head's fc6/fc7, as their own `remat_call`. A layer's backward needs
#               only its input, kept either way, so these recompute nothing; they keep
#               the backward's copies of their inputs (the tap copies of conv.py's CPU
#               kernel gradient: 9 x [256, N*H*W] floats per P2 3x3 conv, the
#               transposes of 1x1 kernel gradients) out of the forward pass, where
#               XLA:CPU's default scheduler puts them and they stay live until used.
# On XLA:CPU the memory saved also depends on the schedule: the default
# (concurrency-optimised) one starts independent work early and keeps it live; see
# `benchmarks/train_step.py --remat ... --cpu-scheduler default,memory`.
REMAT_PARTS = {
    "none": (),
    "backbone": ("resnet",),
    "all": ("resnet", "fpn", "rpn_head", "box_head"),
}


def dataclass_from_mapping(cls, values: Mapping[str, Any], section: str):
    """`cls(**values)` for a frozen config dataclass; unknown keys raise ValueError naming them.

    Lists become tuples (ConfigDict and JSON give lists for tuple fields).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {section} config field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def compute_dtype(cfg: "ModelConfig"):
    """The modules' compute dtype (`ModelConfig.dtype`; parameters stay float32)."""
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Faster R-CNN hyperparameters. Defaults: maskrcnn-benchmark R-50-C4 on COCO."""

    arch: str = "c4"  # "c4": ResNet to layer3 + layer4 box head; "fpn": torchvision's R-50-FPN v1
    num_classes: int = 81  # including background (label 0)

    # Backbone (ResNet with frozen batch norm).
    depth: int = 50
    width: int = 64  # channels of the stem; stage s has width * 2**(s-1) (x4 for bottlenecks)
    stride_in_1x1: bool = False  # True for MSRA / Detectron (Caffe2) weights
    freeze_at: int = 2  # Detectron2 FREEZE_AT: 2 = stem and layer1 frozen
    bn_eps: float = 1e-5  # torchvision's COCO checkpoints run with 0.0
    zero_init_residual: bool = False  # init each residual branch's last conv to 0 (training from scratch)
    fpn_channels: int = 256

    # Anchors: C4 uses every size on its single level; FPN uses size i on level i.
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)

    # RPN: proposals.
    rpn_pre_nms_top_n_train: int = 12000  # per level
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_train: int = 2000  # per image
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_min_size: float = 1e-3
    rpn_score_thresh: float = 0.0
    # RPN: training targets.
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5

    # ROI pooling.
    pooler_resolution: int = 14
    pooler_sampling_ratio: int = 0
    pooler_aligned: bool = False
    # FPN box head.
    representation_size: int = 1024

    # Box head: training targets.
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    rpn_box_loss_beta: float = 1.0 / 9  # smooth-L1 beta of the RPN box loss
    box_loss_beta: float = 1.0  # maskrcnn-benchmark / Detectron; torchvision's fastrcnn_loss uses 1/9
    # Box head: inference.
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    box_min_size: float = 1e-2

    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
    remat: str = "none"  # training memory/time trade-off: "none" | "backbone" | "all" (see REMAT_PARTS)

    def __post_init__(self):
        object.__setattr__(self, "anchor_sizes", tuple(float(s) for s in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(r) for r in self.aspect_ratios))
        object.__setattr__(self, "bbox_reg_weights", tuple(float(w) for w in self.bbox_reg_weights))
        self.validate()

    # --- derived values -------------------------------------------------------------
    @property
    def num_anchors_per_location(self) -> int:
        per_level = len(self.anchor_sizes) if self.arch == "c4" else 1
        return per_level * len(self.aspect_ratios)

    def remats(self, part: str) -> bool:
        """Whether `part` ("resnet", "fpn", "rpn_head", "box_head") is rematerialised (`resnet.remat_call`)."""
        return part in REMAT_PARTS[self.remat]

    def level_anchor_sizes(self) -> tuple[tuple[float, ...], ...]:
        if self.arch == "c4":
            return (self.anchor_sizes,)
        return tuple((s,) for s in self.anchor_sizes)

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """From a plain mapping (e.g. `config.model.to_dict()`); unknown keys raise ValueError."""
        return dataclass_from_mapping(cls, values, "model")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self):
        def fail(field, value, why):
            raise ValueError(f"model.{field}={value!r}: {why}")

        if self.arch not in ARCHS:
            fail("arch", self.arch, f"must be one of {ARCHS}")
        if self.depth not in (18, 34, 50, 101):
            fail("depth", self.depth, "must be 18, 34, 50 or 101")
        if self.arch == "fpn" and len(self.anchor_sizes) != 5:
            fail("anchor_sizes", self.anchor_sizes, "FPN needs exactly 5 sizes (one per level P2-P6)")
        if self.dtype not in ("float32", "bfloat16"):
            fail("dtype", self.dtype, "must be 'float32' or 'bfloat16'")
        if self.remat not in REMAT_PARTS:
            fail("remat", self.remat, f"must be one of {tuple(REMAT_PARTS)}")
        positive_ints = [
            "num_classes", "width", "fpn_channels", "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "rpn_batch_size_per_image",
            "pooler_resolution", "representation_size", "box_batch_size_per_image", "detections_per_img",
        ]  # fmt: skip
        for name in positive_ints:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, v, "must be a positive integer")
        if self.num_classes < 2:
            fail("num_classes", self.num_classes, "must be >= 2 (background + at least one class)")
        if not 0 <= self.freeze_at <= 5:
            fail("freeze_at", self.freeze_at, "must be in 0..5")
        for name in ["rpn_nms_thresh", "box_nms_thresh", "rpn_fg_iou_thresh", "rpn_bg_iou_thresh",
                     "box_fg_iou_thresh", "box_bg_iou_thresh", "rpn_positive_fraction", "box_positive_fraction"]:  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                fail(name, v, "must be in [0, 1]")
        if self.rpn_bg_iou_thresh > self.rpn_fg_iou_thresh:
            fail("rpn_bg_iou_thresh", self.rpn_bg_iou_thresh, "must be <= rpn_fg_iou_thresh")
        if self.box_bg_iou_thresh > self.box_fg_iou_thresh:
            fail("box_bg_iou_thresh", self.box_bg_iou_thresh, "must be <= box_fg_iou_thresh")
        for name in ["rpn_min_size", "box_min_size", "bn_eps", "rpn_box_loss_beta", "box_loss_beta"]:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                fail(name, v, "must be a finite number >= 0")
        if any(s <= 0 for s in self.anchor_sizes) or not self.anchor_sizes:
            fail("anchor_sizes", self.anchor_sizes, "must be positive")
        if any(r <= 0 for r in self.aspect_ratios) or not self.aspect_ratios:
            fail("aspect_ratios", self.aspect_ratios, "must be positive")
        if len(self.bbox_reg_weights) != 4 or any(w <= 0 for w in self.bbox_reg_weights):
            fail("bbox_reg_weights", self.bbox_reg_weights, "must be 4 positive numbers")
