"""The detector's hyperparameters: one frozen, hashable dataclass in sections that mirror the stages.

    ModelConfig
      arch, num_classes, dtype, remat, cpu_kernels
      backbone   BackboneConfig    depth, width, stride_in_1x1, freeze_at, bn_eps, zero_init_residual, fpn_channels
      anchors    AnchorConfig      sizes, aspect_ratios
      rpn        RPNConfig         train / test (ProposalConfig: pre_nms_top_n, post_nms_top_n), nms_thresh,
                                   min_size, score_thresh, assigner (AssignerConfig), box_loss_beta
      roi_heads  RoIHeadsConfig    pooler (PoolerConfig), representation_size, assigner (AssignerConfig),
                                   bbox_reg_weights, box_loss_beta, postprocess (PostprocessConfig)
      mask       MaskHeadConfig    enabled (off: Faster R-CNN), pooler (PoolerConfig), conv_channels,
                                   predictor_channels, train_buckets

`configs/*.py` hold it as a nested ml_collections `ConfigDict` under `config.model` (so
`--config.model.rpn.nms_thresh=0.6` overrides one field); `ModelConfig.from_dict` turns the
nested mapping into this dataclass once, at construction, and the modules read plain values
from their section. Unknown or ill-typed fields fail loudly, naming the dotted field.
The recipes (`r50_c4`, `r50_fpn`, `maskrcnn_r50_fpn`, `maskrcnn_r50_c4`) are the package's one source of the published models'
settings: configs/*.py and the torchvision converter both start from them.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from frcnn_jax.modeling.cpu_kernels import CPU_KERNELS

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


# --- the sections ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """ResNet trunk with frozen batch norm (+ FPN for arch "fpn")."""

    depth: int = 50
    width: int = 64  # channels of the stem; stage s has width * 2**(s-1) (x4 for bottlenecks)
    stride_in_1x1: bool = False  # True for MSRA / Detectron (Caffe2) weights
    freeze_at: int = 2  # Detectron2 FREEZE_AT: 2 = stem and layer1 frozen
    bn_eps: float = 1e-5  # torchvision's COCO checkpoints run with 0.0
    zero_init_residual: bool = False  # init each residual branch's last conv to 0 (training from scratch)
    fpn_channels: int = 256


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """C4 uses every size on its single level; FPN uses size i on level i (P2..P6)."""

    sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)  # height / width

    def __post_init__(self):
        object.__setattr__(self, "sizes", tuple(float(s) for s in self.sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(r) for r in self.aspect_ratios))


@dataclasses.dataclass(frozen=True)
class ProposalConfig:
    """RPN proposal counts of one mode (train or test)."""

    pre_nms_top_n: int = 6000  # anchors kept per level before NMS
    post_nms_top_n: int = 1000  # proposals per image after NMS


@dataclasses.dataclass(frozen=True)
class AssignerConfig:
    """Matcher (IoU thresholds) + balanced sampler of a stage's training targets."""

    fg_iou_thresh: float = 0.5  # IoU >= this: foreground
    bg_iou_thresh: float = 0.5  # IoU < this: background (between the two: ignored)
    batch_size_per_image: int = 512  # samples per image
    positive_fraction: float = 0.25  # at most this fraction of them foreground


@dataclasses.dataclass(frozen=True)
class RPNConfig:
    train: ProposalConfig = ProposalConfig(pre_nms_top_n=12000, post_nms_top_n=2000)
    test: ProposalConfig = ProposalConfig(pre_nms_top_n=6000, post_nms_top_n=1000)
    nms_thresh: float = 0.7
    min_size: float = 1e-3
    score_thresh: float = 0.0
    assigner: AssignerConfig = AssignerConfig(0.7, 0.3, 256, 0.5)
    box_loss_beta: float = 1.0 / 9  # smooth-L1 beta of the RPN box loss

    def proposals(self, train: bool) -> ProposalConfig:
        return self.train if train else self.test


@dataclasses.dataclass(frozen=True)
class PoolerConfig:
    resolution: int = 14  # ROIAlign output size S (S x S)
    sampling_ratio: int = 0  # 0: adaptive (ceil(roi size / S)), as torchvision
    aligned: bool = False


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    min_size: float = 1e-2


@dataclasses.dataclass(frozen=True)
class RoIHeadsConfig:
    pooler: PoolerConfig = PoolerConfig()
    representation_size: int = 1024  # FPN two-MLP head width (C4's head is the trunk's layer4)
    assigner: AssignerConfig = AssignerConfig(0.5, 0.5, 512, 0.25)
    bbox_reg_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)  # box coder, targets and decoding
    box_loss_beta: float = 1.0  # maskrcnn-benchmark / Detectron; torchvision's fastrcnn_loss uses 1/9
    postprocess: PostprocessConfig = PostprocessConfig()

    def __post_init__(self):
        object.__setattr__(self, "bbox_reg_weights", tuple(float(w) for w in self.bbox_reg_weights))


@dataclasses.dataclass(frozen=True)
class MaskHeadConfig:
    """The Mask R-CNN branch (`modeling/mask_head.py`); off by default (Faster R-CNN).

    The mask resolution M follows from the architecture: FPN pools `pooler.resolution`
    (14) and the predictor's 2x2 stride-2 transposed conv doubles it (28); C4 runs the box
    head's res5 (stride 2) first, so M = resolution (14). `conv_channels` are the FPN mask
    head's 3x3 convs (torchvision: 4 x 256); C4 has none (its head is the shared res5).

    `train_buckets` (training only): the mask head runs on a static number of foreground
    slots per image, P = int(roi_heads batch_size_per_image x positive_fraction) at most
    (128). With n buckets the step may run it on P, P/2, ..., P/2^(n-1) slots and takes the
    smallest that holds every image's foreground ROIs (`lax.switch`): the same loss and
    gradients as P slots, at the cost of the positives the batch has (torchvision runs the
    head on exactly those); each bucket compiles once more (the R-50 mask recipes use 3:
    their compile time doubles, their training step on COCO-like batches shortens). The
    taken branch is recomputed in the backward pass (`resnet.remat_switch`), so the buckets
    need no more memory than P slots. 1: always P.
    """

    enabled: bool = False
    pooler: PoolerConfig = PoolerConfig(resolution=14, sampling_ratio=2, aligned=False)
    conv_channels: tuple[int, ...] = (256, 256, 256, 256)
    predictor_channels: int = 256  # conv5_mask (the transposed conv) output channels
    train_buckets: int = 1  # training: 1 = P slots always; the R-50 recipes: 3 (P, P/2, P/4)

    def __post_init__(self):
        object.__setattr__(self, "conv_channels", tuple(self.conv_channels))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Faster R-CNN hyperparameters. Defaults: maskrcnn-benchmark R-50-C4 on COCO."""

    arch: str = "c4"  # "c4": ResNet to layer3 + layer4 box head; "fpn": torchvision's R-50-FPN v1
    num_classes: int = 81  # classes the box predictor scores, INCLUDING background (label 0)
    backbone: BackboneConfig = BackboneConfig()
    anchors: AnchorConfig = AnchorConfig()
    rpn: RPNConfig = RPNConfig()
    roi_heads: RoIHeadsConfig = RoIHeadsConfig()
    mask: MaskHeadConfig = MaskHeadConfig()
    dtype: str = "float32"  # compute dtype: "float32" or "bfloat16" (parameters stay float32)
    remat: str = "none"  # training memory/time trade-off: "none" | "backbone" | "all" (see REMAT_PARTS)
    # XLA:CPU kernel library: "default" or "ynnpack_dots" (`modeling/cpu_kernels.py`); every jit of the model
    # passes `cpu_kernels.compiler_options(cpu_kernels)`. Same parameters; results equal up to float rounding.
    cpu_kernels: str = "default"

    def __post_init__(self):
        self.validate()

    # --- derived values -------------------------------------------------------------
    @property
    def num_anchors_per_location(self) -> int:
        per_level = len(self.anchors.sizes) if self.arch == "c4" else 1
        return per_level * len(self.anchors.aspect_ratios)

    def remats(self, part: str) -> bool:
        """Whether `part` ("resnet", "fpn", "rpn_head", "box_head") is rematerialised (`resnet.remat_call`)."""
        return part in REMAT_PARTS[self.remat]

    def level_anchor_sizes(self) -> tuple[tuple[float, ...], ...]:
        """Anchor sizes per RPN level: C4 ((all sizes),); FPN ((s_2,), ..., (s_6,))."""
        if self.arch == "c4":
            return (self.anchors.sizes,)
        return tuple((s,) for s in self.anchors.sizes)

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """From a nested mapping (e.g. `config.model.to_dict()`); missing fields keep their defaults.

        Keys may also be dotted paths ("rpn.train.pre_nms_top_n"). Unknown keys raise ValueError
        naming the dotted field ("model.rpn.nms_thres").
        """
        return cls().updated(values)

    def updated(self, values: Mapping[str, Any]) -> ModelConfig:
        """A copy with the fields in `values` (nested and/or dotted keys, as `from_dict`) replaced."""
        return replace_from_mapping(self, values, "model")

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples as lists), as written to JSON and read back by `from_dict`.

        The `mask` section is left out while it is the default (off): a Faster R-CNN
        config, checkpoint or artifact reads exactly as before the mask branch existed.
        """
        out = _lists(dataclasses.asdict(self))
        if self.mask == MaskHeadConfig():
            del out["mask"]
        return out

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def validate(self):
        def get(path):
            v = self
            for name in path.split("."):
                v = getattr(v, name)
            return v

        def fail(path, why):
            raise ValueError(f"model.{path}={get(path)!r}: {why}")

        if self.arch not in ARCHS:
            fail("arch", f"must be one of {ARCHS}")
        if self.backbone.depth not in (18, 34, 50, 101):
            fail("backbone.depth", "must be 18, 34, 50 or 101")
        if self.arch == "fpn" and len(self.anchors.sizes) != 5:
            fail("anchors.sizes", "FPN needs exactly 5 sizes (one per level P2-P6)")
        if self.dtype not in ("float32", "bfloat16"):
            fail("dtype", "must be 'float32' or 'bfloat16'")
        if self.remat not in REMAT_PARTS:
            fail("remat", f"must be one of {tuple(REMAT_PARTS)}")
        if self.cpu_kernels not in CPU_KERNELS:
            fail("cpu_kernels", f"must be one of {CPU_KERNELS}")
        positive_ints = [
            "num_classes", "backbone.width", "backbone.fpn_channels", "rpn.train.pre_nms_top_n",
            "rpn.test.pre_nms_top_n", "rpn.train.post_nms_top_n", "rpn.test.post_nms_top_n",
            "rpn.assigner.batch_size_per_image", "roi_heads.pooler.resolution", "roi_heads.representation_size",
            "roi_heads.assigner.batch_size_per_image", "roi_heads.postprocess.detections_per_img",
        ]  # fmt: skip
        for path in positive_ints:
            v = get(path)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(path, "must be a positive integer")
        if self.num_classes < 2:
            fail("num_classes", "must be >= 2 (background + at least one class)")
        if not 0 <= self.backbone.freeze_at <= 5:
            fail("backbone.freeze_at", "must be in 0..5")
        fractions = ["rpn.nms_thresh", "roi_heads.postprocess.nms_thresh"] + [
            f"{stage}.assigner.{name}"
            for stage in ("rpn", "roi_heads")
            for name in ("fg_iou_thresh", "bg_iou_thresh", "positive_fraction")
        ]
        for path in fractions:
            v = get(path)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                fail(path, "must be in [0, 1]")
        for stage in ("rpn", "roi_heads"):
            if get(f"{stage}.assigner.bg_iou_thresh") > get(f"{stage}.assigner.fg_iou_thresh"):
                fail(f"{stage}.assigner.bg_iou_thresh", f"must be <= {stage}.assigner.fg_iou_thresh")
        non_negative = [
            "rpn.min_size", "roi_heads.postprocess.min_size", "backbone.bn_eps", "rpn.box_loss_beta",
            "roi_heads.box_loss_beta",
        ]  # fmt: skip
        for path in non_negative:
            v = get(path)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                fail(path, "must be a finite number >= 0")
        if not self.anchors.sizes or any(s <= 0 for s in self.anchors.sizes):
            fail("anchors.sizes", "must be positive")
        if not self.anchors.aspect_ratios or any(r <= 0 for r in self.anchors.aspect_ratios):
            fail("anchors.aspect_ratios", "must be positive")
        if self.mask.enabled:
            for path in ("mask.pooler.resolution", "mask.predictor_channels", "mask.train_buckets"):
                v = get(path)
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    fail(path, "must be a positive integer")
            if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in self.mask.conv_channels):
                fail("mask.conv_channels", "must be positive integers")
            if self.arch == "c4" and self.mask.conv_channels:
                fail("mask.conv_channels", "must be empty for C4 (its mask head is the box head's res5)")
            if self.arch == "c4" and self.mask.pooler.resolution % 2:
                fail("mask.pooler.resolution", "must be even for C4 (res5 halves it)")
        weights = self.roi_heads.bbox_reg_weights
        if len(weights) != 4 or any(w <= 0 for w in weights):
            fail("roi_heads.bbox_reg_weights", "must be 4 positive numbers")


def compute_dtype(cfg: ModelConfig):
    """The modules' compute dtype (`ModelConfig.dtype`; parameters stay float32)."""
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


# --- recipes: the one source of the published models' settings -------------------------


def r50_c4(num_classes: int = 81, **changes) -> ModelConfig:
    """maskrcnn-benchmark's R-50-C4 (the defaults): 15 anchors, RPN 12000/6000 -> 2000/1000, ROIAlign 14x14.

    `changes`: nested / dotted fields as in `ModelConfig.from_dict`.
    """
    return ModelConfig(num_classes=num_classes).updated(changes)


def r50_fpn(num_classes: int = 91, **changes) -> ModelConfig:
    """torchvision's fasterrcnn_resnet50_fpn (v1): ResNet-50 + FPN P2-P6, one anchor size per level,
    RPN pre-NMS 2000/1000 per level, post-NMS 2000/1000, MultiScaleRoIAlign 7x7 sampling 2, two-MLP head 1024.

    `changes`: nested / dotted fields as in `ModelConfig.from_dict` (e.g. {"backbone.bn_eps": 0.0}).
    """
    recipe = {
        "arch": "fpn",
        "num_classes": num_classes,
        "backbone": {"depth": 50, "freeze_at": 2},
        "anchors": {"sizes": (32.0, 64.0, 128.0, 256.0, 512.0)},
        "rpn": {"train": {"pre_nms_top_n": 2000, "post_nms_top_n": 2000},
                "test": {"pre_nms_top_n": 1000, "post_nms_top_n": 1000}},
        "roi_heads": {"pooler": {"resolution": 7, "sampling_ratio": 2}, "representation_size": 1024,
                      "assigner": {"batch_size_per_image": 512}},
    }  # fmt: skip
    return ModelConfig().updated(recipe).updated(changes)


def maskrcnn_r50_fpn(num_classes: int = 91, **changes) -> ModelConfig:
    """torchvision's maskrcnn_resnet50_fpn (v1): `r50_fpn` plus the mask branch, MultiScaleRoIAlign 14x14
    sampling 2 on P2-P5, 4 x (3x3 conv 256 + ReLU), ConvTranspose 2x2 s2 256 + ReLU, 1x1 -> K: 28x28.

    `changes`: nested / dotted fields (e.g. {"mask.conv_channels": (32, 32)} for a lighter head).
    """
    recipe = {"mask": {"enabled": True, "pooler": {"resolution": 14, "sampling_ratio": 2, "aligned": False},
                       "conv_channels": (256, 256, 256, 256), "predictor_channels": 256, "train_buckets": 3}}  # fmt: skip
    return r50_fpn(num_classes).updated(recipe).updated(changes)


def maskrcnn_r50_c4(num_classes: int = 81, **changes) -> ModelConfig:
    """maskrcnn-benchmark's R-50-C4 Mask R-CNN: `r50_c4` plus ROIAlign 14x14 (adaptive sampling) of the
    detections, the box head's res5 (shared parameters), ConvTranspose 2048->256 2x2 s2 + ReLU, 1x1 -> K: 14x14.
    """
    recipe = {"mask": {"enabled": True, "pooler": {"resolution": 14, "sampling_ratio": 0, "aligned": False},
                       "conv_channels": (), "predictor_channels": 256, "train_buckets": 3}}  # fmt: skip
    return r50_c4(num_classes).updated(recipe).updated(changes)


# --- mapping <-> dataclass ------------------------------------------------------------


def _lists(tree):
    if isinstance(tree, dict):
        return {k: _lists(v) for k, v in tree.items()}
    return list(tree) if isinstance(tree, tuple) else tree


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b": 1, "a": {"c": {"d": 2}}, "a.c.e": 3} -> {"a": {"b": 1, "c": {"d": 2, "e": 3}}}.

    Dotted keys become sections; sections given twice are merged (later keys win).
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = str(key).partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, Mapping):
            value = _nest(value)
            prev = out.get(head)
            out[head] = _merge(prev, value) if isinstance(prev, Mapping) else value
        else:
            out[head] = value
    return out


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two nested dicts; b wins."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"dotted.path": leaf} (the inverse of the dotted keys `from_dict` takes)."""
    out = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def replace_from_mapping(instance, values: Mapping[str, Any], section: str):
    """`instance` (a frozen config dataclass) with the fields in `values` replaced, sections recursively.

    Lists become tuples (ConfigDict and JSON give lists for tuple fields). Unknown keys raise
    ValueError naming the dotted field and the section's valid fields.
    """
    cls = type(instance)
    names = [f.name for f in dataclasses.fields(cls)]
    values = _nest(values)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
            f"valid fields of {section}: {', '.join(names)}"
        )
    hints = typing.get_type_hints(cls)
    changes = {}
    for key, value in values.items():
        current = getattr(instance, key)
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, hints[key]):
                changes[key] = value
            elif isinstance(value, Mapping):
                changes[key] = replace_from_mapping(current, value, f"{section}.{key}")
            else:
                raise ValueError(f"{section}.{key}={value!r}: a section; set its fields ({section}.{key}.FIELD)")
        else:
            changes[key] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(instance, **changes) if changes else instance


def dataclass_from_mapping(cls, values: Mapping[str, Any], section: str):
    """`cls(**values)` for a frozen config dataclass with defaults; unknown keys raise ValueError naming them."""
    return replace_from_mapping(cls(), values, section)
