"""ROI heads, both paths: pooling, box head, predictor, (training) targets and loss, post-processing.

    RoIHeads.__call__(features, boxes, canvas_hw)   -> class logits, class-specific deltas
    RoIHeads.detections(...)                        -> final detections (inference)
    RoIHeads.losses(...)                            -> loss_classifier, loss_box_reg (training),
                                                       and loss_mask (Mask R-CNN: `mask_head.mask_head_targets`,
                                                       `mask_head.mask_loss`)
    RoIHeads.masks(...)                             -> mask probabilities of the detections (Mask R-CNN)
    box_head_targets / box_head_loss                -> the per-image sampling and the batch loss they use

The pieces it composes live beside it and arrive as an `architectures.Architecture`
(which pooler, which box head, which mask head): `poolers.RoIPooler`, `box_head` (the C4
res5 head, the FPN two-MLP head, the predictor), `postprocess.postprocess_detections`
and, when `cfg.mask.enabled`, the mask branch of `mask_head.py`.

Shapes: B images, P proposals per image, S = sampled ROIs per image, K classes including
background (label 0), G padded ground-truth boxes.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax import ops
from frcnn_jax.modeling.architectures import Architecture, architecture
from frcnn_jax.modeling.box_head import FastRCNNPredictor
from frcnn_jax.modeling.config import ModelConfig, compute_dtype
from frcnn_jax.modeling.mask_head import (
    MaskRCNNPredictor,
    bucket_index,
    label_mask_loss,
    mask_head_targets,
    mask_probabilities,
    slot_buckets,
)
from frcnn_jax.modeling.matcher import match
from frcnn_jax.modeling.postprocess import postprocess_detections
from frcnn_jax.modeling.resnet import remat_switch
from frcnn_jax.modeling.sampler import sample_balanced, sampled_indices
from frcnn_jax.ops import losses


def box_head_targets(
    key,
    proposals,
    proposal_valid,
    gt_boxes,
    gt_labels,
    gt_valid,
    *,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
    bbox_reg_weights,
):
    """Sampled ROIs and their targets for ONE image (torchvision `select_training_samples`).

    Ground-truth boxes are appended to the proposals, every candidate is matched
    (IoU >= fg: its ground truth's class; < bg: background), and a balanced sample of
    S = batch_size_per_image candidates is drawn. Crowd boxes are passed as invalid
    ground truth; an image without ground truth gives all-background samples.

    Args:
      proposals: [P, 4] (stop-gradient), proposal_valid: [P] bool.
      gt_boxes: [G, 4], gt_labels: [G] int32 (1..K-1), gt_valid: [G] bool.
    Returns:
      dict: boxes [S, 4] sampled ROIs, labels [S] int32 (0 background), targets [S, 4]
      (`encode_boxes(gt, roi, bbox_reg_weights)`, zero for background), valid [S] bool
      (False where there were fewer than S candidates), index [S] into the
      concatenation [proposals; gt_boxes], matched [S] int32 each ROI's ground-truth
      row in 0..G-1 (meaningful for foreground ROIs only; the mask branch's targets).
    """
    boxes = jnp.concatenate([proposals, gt_boxes], axis=0)
    valid = jnp.concatenate([proposal_valid, gt_valid], axis=0)
    iou = ops.box_iou(gt_boxes, boxes)
    iou = jnp.where(valid[None, :], iou, -1.0)
    matches = match(iou, gt_valid, fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
    safe = jnp.maximum(matches, 0)
    labels = jnp.where(matches >= 0, gt_labels[safe], jnp.where(matches == -1, 0, -1))
    labels = jnp.where(valid, labels, -1).astype(jnp.int32)
    positive, negative = sample_balanced(key, labels, batch_size_per_image, positive_fraction)
    index, sample_valid = sampled_indices(positive, negative, batch_size_per_image)
    roi = boxes[index]
    roi_labels = jnp.where(sample_valid, labels[index], 0)
    targets = ops.encode_boxes(gt_boxes[safe[index]], roi, bbox_reg_weights)
    targets = jnp.where((roi_labels > 0)[:, None], targets, 0.0)
    return {
        "boxes": roi,
        "labels": roi_labels,
        "targets": targets,
        "valid": sample_valid,
        "index": index,
        "matched": safe[index].astype(jnp.int32),
    }


def box_head_loss(class_logits, box_deltas, targets, *, beta: float = 1.0):
    """Fast R-CNN loss over a batch of sampled ROIs.

    Args:
      class_logits: [B, S, K]; box_deltas: [B, S, K, 4] class-specific deltas.
      targets: dict from `box_head_targets`, batched: labels [B, S], targets [B, S, 4], valid [B, S].
      beta: smooth-L1 beta: 1.0 as maskrcnn-benchmark / Detectron (torchvision's
        `fastrcnn_loss` uses 1/9).
    Returns:
      (loss_classifier, loss_box_reg): softmax cross-entropy averaged over the sampled
      ROIs, and smooth-L1 on the deltas of each foreground ROI's own class, summed and
      divided by the number of sampled ROIs.
    """
    labels, valid = targets["labels"], targets["valid"]
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    ce = losses.softmax_cross_entropy(class_logits.astype(jnp.float32), labels)
    loss_cls = jnp.sum(jnp.where(valid, ce, 0.0)) / count
    fg = valid & (labels > 0)
    pred = jnp.take_along_axis(box_deltas.astype(jnp.float32), labels[..., None, None], axis=-2)[..., 0, :]
    reg = losses.smooth_l1(pred - targets["targets"], beta).sum(-1)
    loss_box = jnp.sum(jnp.where(fg, reg, 0.0)) / count
    return loss_cls, loss_box


class RoIHeads(nn.Module):
    """The ROI-heads stage: box head (`roi_heads/box_head`) + predictor (`roi_heads/box_predictor`),
    and with `cfg.mask.enabled` the mask branch (`roi_heads/mask_head`, `roi_heads/mask_predictor`).

    parts: the poolers and heads (`architectures.architecture(cfg)` when not given).
    """

    cfg: ModelConfig
    parts: Architecture | None = None

    def setup(self):
        cfg = self.cfg
        parts = self.parts if self.parts is not None else architecture(cfg)
        self.box_pooler = parts.box_pooler
        self.box_head = parts.box_head()
        self.box_predictor = FastRCNNPredictor(cfg.num_classes, dtype=compute_dtype(cfg))
        if cfg.mask.enabled:
            self.mask_pooler = parts.mask_pooler
            self.mask_head = parts.mask_head() if parts.mask_head is not None else None
            self.mask_predictor = MaskRCNNPredictor(
                cfg.num_classes, cfg.mask.predictor_channels, dtype=compute_dtype(cfg)
            )
            self.mask_resolution = parts.mask_resolution

    def __call__(self, features, boxes, canvas_hw):
        """Pools `boxes` [B, P, 4] from `features` (the RPN levels) -> logits [B, P, K], deltas [B, P, K, 4]."""
        b, p, _ = boxes.shape
        pooled = self.box_pooler(features, boxes, canvas_hw)
        logits, deltas = self.box_predictor(self.box_head(pooled.astype(compute_dtype(self.cfg))))
        return logits.reshape(b, p, -1), deltas.reshape(b, p, -1, 4)

    def masks(self, features, boxes, labels, valid, canvas_hw):
        """Mask R-CNN inference (`cfg.mask.enabled`): boxes [B, D, 4] canvas pixels, labels [B, D] int32,
        valid [B, D] bool -> [B, D, M, M] float32 probabilities of each box's label (0 where invalid)."""
        head = self.box_head.features if self.mask_head is None else self.mask_head  # C4: the shared res5
        return mask_probabilities(
            self.mask_pooler, head, self.mask_predictor, features, boxes, labels, valid, canvas_hw
        )

    def detections(self, features, proposals, proposal_valid, image_sizes, canvas_hw):
        """Inference: proposals [B, P, 4] + valid [B, P] -> (detections, logits [B, P, K], deltas [B, P, K, 4]).

        detections: boxes [B, D, 4] (canvas pixels), scores [B, D], labels [B, D] int32,
        valid [B, D] bool; D = roi_heads.postprocess.detections_per_img (see `postprocess_detections`);
        with `cfg.mask.enabled` also masks [B, D, M, M] float32 (`masks`).
        """
        heads = self.cfg.roi_heads
        logits, deltas = self(features, proposals, canvas_hw)
        post = functools.partial(
            postprocess_detections,
            bbox_reg_weights=heads.bbox_reg_weights,
            **dataclasses.asdict(heads.postprocess),
        )
        dets = jax.vmap(post)(logits, deltas, proposals, proposal_valid, image_sizes)
        if self.cfg.mask.enabled:
            dets["masks"] = self.masks(features, dets["boxes"], dets["labels"], dets["valid"], canvas_hw)
        return dets, logits, deltas

    def losses(self, features, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, canvas_hw, key, gt_masks=None):
        """Training: sample ROIs from the proposals (+ ground truth), pool, predict, loss.

        proposals [B, P, 4] (gradients stopped here), proposal_valid [B, P]; gt_boxes [B, G, 4],
        gt_labels [B, G] int32, gt_valid [B, G] (crowd excluded); key: PRNG key (split per image).
        gt_masks (with `cfg.mask.enabled`): dict crops [B, G, S, S] uint8 (`batch["gt_masks"]`),
        boxes [B, G, 4] float32 (`batch["gt_mask_boxes"]`), image_size [B, 2] int32.
        Returns: ({"loss_classifier", "loss_box_reg"[, "loss_mask"]} float32 scalars,
        foreground [B] int32 sampled foreground ROIs).

        The mask branch (torchvision's `maskrcnn_loss`) takes the sampled foreground ROIs,
        P = int(batch_size_per_image * positive_fraction) per image (all the sampler can
        keep) with a validity mask; FPN pools them again for its mask head, C4 reuses the
        box head's res5 output of those ROIs (maskrcnn-benchmark's shared feature extractor).
        The head runs on the fewest of `slot_buckets(P, cfg.mask.train_buckets)` slots that
        hold every image's positives (`resnet.remat_switch`: exactly the loss and gradients of
        all P slots, with the memory of P slots alone).
        """
        cfg, heads = self.cfg, self.cfg.roi_heads
        targets = jax.vmap(
            functools.partial(
                box_head_targets, bbox_reg_weights=heads.bbox_reg_weights, **dataclasses.asdict(heads.assigner)
            )
        )(jax.random.split(key, gt_boxes.shape[0]), jax.lax.stop_gradient(proposals), proposal_valid, gt_boxes,
          gt_labels, gt_valid)  # fmt: skip
        rois = targets["boxes"]
        b, r, _ = rois.shape
        shared_res5 = cfg.mask.enabled and self.mask_head is None
        if shared_res5:  # C4: res5 once, for both branches
            pooled = self.box_pooler(features, rois, canvas_hw).astype(compute_dtype(cfg))
            trunk = self.box_head.features(pooled)  # [B * R, s, s, C]
            logits, deltas = self.box_predictor(jnp.mean(trunk.astype(jnp.float32), axis=(1, 2)))
            logits, deltas = logits.reshape(b, r, -1), deltas.reshape(b, r, -1, 4)
        else:
            logits, deltas = self(features, rois, canvas_hw)
        loss_cls, loss_box = box_head_loss(logits, deltas, targets, beta=heads.box_loss_beta)
        out = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
        if cfg.mask.enabled:
            if gt_masks is None:
                raise ValueError("cfg.mask.enabled: RoIHeads.losses needs gt_masks (batch gt_masks, gt_mask_boxes)")
            a = heads.assigner
            mt = mask_head_targets(
                rois, targets["labels"], targets["valid"], targets["matched"], gt_masks["crops"], gt_masks["boxes"],
                gt_masks["image_size"], num_positives=int(a.batch_size_per_image * a.positive_fraction),
                mask_size=2 * trunk.shape[1] if shared_res5 else self.mask_resolution,
            )  # fmt: skip
            source = trunk if shared_res5 else features
            buckets = slot_buckets(mt["index"].shape[1], cfg.mask.train_buckets)
            branches = [functools.partial(_mask_branch_loss, slots=n, canvas_hw=canvas_hw) for n in buckets]
            if len(branches) == 1:
                out["loss_mask"] = branches[0](self, source, mt)
            else:  # the head on the fewest slots that hold every image's positives: the same loss
                index = functools.partial(_bucket_of, buckets=buckets)
                if self.is_initializing():
                    out["loss_mask"] = nn.switch(index(source, mt), branches, self, source, mt)
                else:  # each branch recomputed in the backward pass: the buckets' activations do not add up
                    out["loss_mask"] = remat_switch(self, index, branches, source, mt)
        return out, jnp.sum(targets["valid"] & (targets["labels"] > 0), axis=1)


def _bucket_of(source, mt, *, buckets: tuple[int, ...]):
    """The branch of `RoIHeads.losses`' bucket switch: the fewest slots that hold every image's positives."""
    del source
    return bucket_index(mt["valid"], buckets)


def _mask_branch_loss(heads: RoIHeads, source, mt, *, slots: int, canvas_hw):
    """loss_mask on each image's first `slots` foreground slots of `mask_head_targets`' output `mt`.

    source: C4 the box head's res5 output [B * R, s, s, C] of the sampled ROIs (reused),
    FPN the feature levels (pooled again at the positives).
    """
    mt = {k: v[:, :slots] for k, v in mt.items()}
    b = mt["index"].shape[0]
    labels = mt["labels"].reshape(-1)
    if heads.mask_head is None:  # C4: the shared res5's rows of these ROIs
        r = source.shape[0] // b
        rows = (jnp.arange(b, dtype=jnp.int32)[:, None] * r + mt["index"]).reshape(-1)
        logits = heads.mask_predictor(source[rows], labels)  # [B * slots, M, M]
    else:
        pooled = heads.mask_pooler(source, mt["boxes"], canvas_hw)
        logits = heads.mask_predictor(heads.mask_head(pooled), labels)
    return label_mask_loss(logits.reshape(mt["targets"].shape), mt["targets"], mt["valid"])
