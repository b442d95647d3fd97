"""torchvision reference detectors for parity tests (FPN v1 and the slides' R-50-C4, Faster and Mask R-CNN).

Random weights are calibrated as ../shared/design/REFERENCE.md advises: every frozen
batch norm gets its running mean/variance from the statistics of its actual input
(times a random factor) and a random affine, so activations keep a useful range
through 50 layers; head weights get spreads that make objectness and class scores
vary, so NMS has real work to do. Mask R-CNN's mask logits sit far below zero with
random weights (every mask empty); `calibrate_masks` shifts each class's
`mask_fcn_logits` bias so its logits have median 0 on a calibration image.
"""

from __future__ import annotations

import collections

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign


class C4Backbone(nn.Module):
    """ResNet-50 stem + layer1-3 under `body` (keys backbone.body.*), stride 16, 1024 channels."""

    def __init__(self, resnet):
        super().__init__()
        self.body = torchvision.models._utils.IntermediateLayerGetter(resnet, {"layer3": "0"})
        self.out_channels = 1024

    def forward(self, x):
        return self.body(x)


class C4BoxHead(nn.Module):
    """ResNet-50 layer4 (keys roi_heads.box_head.layer4.*) + 7x7 average pool."""

    def __init__(self, layer4):
        super().__init__()
        self.layer4 = layer4

    def forward(self, x):
        return torch.flatten(F.avg_pool2d(self.layer4(x), 7), 1)


def build_fpn(num_classes=91, eps=0.0, **kwargs):
    """torchvision's fasterrcnn_resnet50_fpn v1 with FrozenBatchNorm (as its COCO weights run)."""
    resnet = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(resnet, 3)
    model = FasterRCNN(backbone, num_classes=num_classes, **kwargs)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps
    return model.eval()


# maskrcnn-benchmark's R-50-C4 RPN sizes (torchvision's FasterRCNN defaults are the FPN's, per level).
C4_RPN_TOP_N = dict(
    rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=1000, rpn_pre_nms_top_n_train=12000,
    rpn_post_nms_top_n_train=2000,
)  # fmt: skip


def build_c4(num_classes=81, anchor_sizes=(32, 64, 128, 256, 512), eps=1e-5, **kwargs):
    """The slides' R-50-C4 assembled from torchvision parts."""
    resnet = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    for m in resnet.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps
    anchor_gen = AnchorGenerator(sizes=(tuple(anchor_sizes),), aspect_ratios=((0.5, 1.0, 2.0),))
    defaults = {**C4_RPN_TOP_N, **kwargs}
    model = FasterRCNN(
        C4Backbone(resnet),
        num_classes=None,
        rpn_anchor_generator=anchor_gen,
        # One level '0': MultiScaleRoIAlign infers the scale 1/16 from the feature size.
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
        box_head=C4BoxHead(resnet.layer4),
        box_predictor=FastRCNNPredictor(2048, num_classes),
        **defaults,
    )
    return model.eval()


def build_maskrcnn_fpn(num_classes=91, eps=0.0, **kwargs):
    """torchvision's maskrcnn_resnet50_fpn v1 (random weights) with FrozenBatchNorm eps `eps`."""
    resnet = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    model = MaskRCNN(_resnet_fpn_extractor(resnet, 3), num_classes=num_classes, **kwargs)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps
    return model.eval()


def build_maskrcnn_c4(num_classes=81, anchor_sizes=(32, 64, 128, 256, 512), eps=1e-5, **kwargs):
    """maskrcnn-benchmark's R-50-C4 Mask R-CNN from torchvision parts: `build_c4`'s detector plus
    ROIAlign 14x14 (one level, adaptive sampling) of the detections, the box head's layer4 as the mask
    head (the same module: its parameters appear as roi_heads.box_head.layer4.* and roi_heads.mask_head.*),
    MaskRCNNPredictor(2048, 256, K)."""
    c4 = build_c4(num_classes, anchor_sizes, eps, **kwargs)
    rpn, heads = c4.rpn, c4.roi_heads
    defaults = {**C4_RPN_TOP_N, **kwargs}
    model = MaskRCNN(
        c4.backbone,
        num_classes=None,
        rpn_anchor_generator=rpn.anchor_generator,
        box_roi_pool=heads.box_roi_pool,
        box_head=heads.box_head,
        box_predictor=heads.box_predictor,
        mask_roi_pool=MultiScaleRoIAlign(["0"], output_size=14, sampling_ratio=0),
        mask_head=heads.box_head.layer4,
        mask_predictor=MaskRCNNPredictor(2048, 256, num_classes),
        **defaults,
    )
    return model.eval()


@torch.no_grad()
def mask_logits_for(model, features, boxes: list[torch.Tensor], image_sizes) -> torch.Tensor:
    """torchvision's mask branch on given boxes (resized-image pixels): [sum N, K, M, M] logits."""
    pooled = model.roi_heads.mask_roi_pool(features, boxes, image_sizes)
    return model.roi_heads.mask_predictor(model.roi_heads.mask_head(pooled))


@torch.no_grad()
def calibrate_masks(model, images: torch.Tensor):
    """Shifts `mask_fcn_logits.bias` so each class's logits have median 0 over the detections of `images`.

    Call after `calibrate` (the detections depend on the calibrated weights). Returns the
    detections used: a list (one per image) of torchvision's result dicts.
    """
    sizes = [tuple(images.shape[-2:])] * images.shape[0]
    il = torchvision.models.detection.image_list.ImageList(images, sizes)
    feats = model.backbone(images)
    proposals, _ = model.rpn(il, feats)
    heads = model.roi_heads
    saved = heads.mask_roi_pool
    heads.mask_roi_pool = None  # boxes only
    detections, _ = heads(feats, proposals, sizes)
    heads.mask_roi_pool = saved
    logits = mask_logits_for(model, feats, [d["boxes"] for d in detections], sizes)
    median = logits.transpose(0, 1).reshape(logits.shape[1], -1).median(dim=1).values
    heads.mask_predictor.mask_fcn_logits.bias.sub_(median)
    return detections


@torch.no_grad()
def calibrate(model, images: torch.Tensor, seed: int = 0):
    """Sets frozen-BN statistics from their real inputs and spreads the head weights."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    def pre_hook(module, inputs):
        x = inputs[0]
        c = x.shape[1]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3))
        module.running_mean.copy_(mean + 0.1 * var.sqrt() * torch.randn(c, generator=gen))
        module.running_var.copy_(var * rand(c, 0.7, 1.4) + 1e-3)
        module.weight.copy_(rand(c, 0.6, 1.4))
        module.bias.copy_(0.2 * torch.randn(c, generator=gen))

    handles = [
        m.register_forward_pre_hook(pre_hook) for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)
    ]
    feats = model.backbone(images)
    for h in handles:
        h.remove()

    # Spread RPN objectness and box-head class scores.
    head = model.rpn.head
    for p in head.parameters():
        p.normal_(0.0, 0.01, generator=gen)
    head.cls_logits.weight.normal_(0.0, 0.08, generator=gen)
    head.bbox_pred.weight.normal_(0.0, 0.02, generator=gen)

    # Calibrate the box head's frozen BNs (C4 layer4) on pooled proposals.
    box_head_bns = [m for m in model.roi_heads.box_head.modules() if isinstance(m, FrozenBatchNorm2d)]
    if box_head_bns:
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        il = torchvision.models.detection.image_list.ImageList(images, sizes)
        proposals, _ = model.rpn(il, feats)
        pooled = model.roi_heads.box_roi_pool(feats, [p[:200] for p in proposals], sizes)
        handles = [m.register_forward_pre_hook(pre_hook) for m in box_head_bns]
        model.roi_heads.box_head(pooled)
        for h in handles:
            h.remove()

    pred = model.roi_heads.box_predictor
    pred.cls_score.weight.normal_(0.0, 0.05, generator=gen)
    pred.cls_score.bias.normal_(0.0, 0.5, generator=gen)
    pred.bbox_pred.weight.normal_(0.0, 0.01, generator=gen)
    pred.bbox_pred.bias.zero_()
    return model


def rpn_head_outputs(model, features: collections.OrderedDict):
    """torchvision RPN head outputs in our layout: objectness [N, H*W*A], deltas [N, H*W*A, 4] per level."""
    obj, deltas = model.rpn.head(list(features.values()))
    out_o, out_d = [], []
    for o, d in zip(obj, deltas):
        n, a, h, w = o.shape
        out_o.append(o.permute(0, 2, 3, 1).reshape(n, -1).numpy())
        out_d.append(d.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4).numpy())
    return out_o, out_d


def structured_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] uint8: smooth noise plus solid rectangles (gives full post-NMS proposal sets)."""
    small = rng.uniform(0, 255, (h // 16 + 2, w // 16 + 2, 3))
    img = np.asarray(
        torch.nn.functional.interpolate(torch.from_numpy(small).permute(2, 0, 1)[None], size=(h, w), mode="bilinear")[0]
        .permute(1, 2, 0)
        .numpy()
    )
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        y1, x1 = y0 + rng.integers(15, h // 2), x0 + rng.integers(15, w // 2)
        img[y0:y1, x0:x1] = rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)
