"""Faster R-CNN: backbone -> RPN -> ROI heads, for inference (`__call__`) and training (`losses`);
Mask R-CNN when `cfg.mask.enabled` (the ROI heads add the mask branch of `mask_head.py`).

A thin composition of the stages beside it (`rpn.py`, `roi_heads.py` each own their
inference and training paths); `architectures.architecture(cfg)` says which backbone,
poolers and heads `cfg.arch` uses. The parameter tree mirrors torchvision's module names
(`backbone/body/...`, `backbone/fpn/...`, `rpn/head/...`, `roi_heads/box_head/...`,
`roi_heads/box_predictor/...`, `roi_heads/mask_head/...`, `roi_heads/mask_predictor/...`;
`param_paths.py` holds what depends on them), and frozen
batch-norm statistics live in the `"frozen"` collection:

    variables = init_variables(model, rng)                    # {"params", "frozen"}
    detections = model.apply(variables, images, image_sizes)
    losses, stats = model.apply(variables, batch, key, method=FasterRCNN.losses)

Everything runs under one `jax.jit` with static shapes: images [B, H, W, 3] on a
fixed canvas, `image_sizes` [B, 2] the true (h, w) of each resized image inside it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.modeling.architectures import architecture
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.roi_heads import RoIHeads
from frcnn_jax.modeling.rpn import RPN, rpn_anchors, rpn_losses, rpn_proposals

# The box model's four training losses, in the order of the stages (`FasterRCNN.losses`);
# `loss_names(cfg)` is the one place that says which losses a model has.
LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")
MASK_LOSS_NAMES = ("loss_mask",)  # Mask R-CNN adds these (`cfg.mask.enabled`)
ALL_LOSS_NAMES = LOSS_NAMES + MASK_LOSS_NAMES  # every loss any model has, in display order
STAT_NAMES = ("rpn_positives", "roi_foreground", "proposals")  # sampling statistics, per-image means


def loss_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The names of the losses `FasterRCNN(cfg).losses` returns, in order (metrics, plots, checks)."""
    return LOSS_NAMES + (MASK_LOSS_NAMES if cfg.mask.enabled else ())


class FasterRCNN(nn.Module):
    cfg: ModelConfig

    def setup(self):
        parts = architecture(self.cfg)  # the one place that knows what `cfg.arch` builds
        self.backbone = parts.backbone()
        self.rpn = RPN(self.cfg)
        self.roi_heads = RoIHeads(self.cfg, parts)

    def features(self, images):
        """[B, H, W, 3] normalised canvas -> list of NHWC feature maps (RPN levels)."""
        return self.backbone(images)

    # --- inference ---------------------------------------------------------------------
    def __call__(self, images, image_sizes, *, return_intermediates: bool = False):
        """Detections for a batch on one canvas.

        Args:
          images: [B, H, W, 3] float normalised images, zero-padded to the canvas.
          image_sizes: [B, 2] int32 (h, w) of each resized image inside the canvas.
        Returns:
          dict: boxes [B, D, 4] (canvas pixels), scores [B, D], labels [B, D] int32,
          valid [B, D] bool (D = roi_heads.postprocess.detections_per_img); with `cfg.mask.enabled`,
          masks [B, D, M, M] float32 (each detection's label probabilities; 0 in invalid rows; M =
          `architecture(cfg).mask_resolution`). With `return_intermediates`, also
          features, objectness, rpn_deltas, proposals, proposal_scores, proposal_valid,
          class_logits, box_deltas.
        """
        canvas_hw = images.shape[1:3]
        feats = self.features(images)
        objectness, rpn_deltas = self.rpn(feats)
        anchors = rpn_anchors(self.cfg, canvas_hw, feats)
        props, prop_scores, prop_valid = rpn_proposals(
            self.cfg, objectness, rpn_deltas, anchors, image_sizes, train=False
        )
        dets, logits, deltas = self.roi_heads.detections(feats, props, prop_valid, image_sizes, canvas_hw)
        if return_intermediates:
            dets.update(
                features=feats,
                objectness=objectness,
                rpn_deltas=rpn_deltas,
                proposals=props,
                proposal_scores=prop_scores,
                proposal_valid=prop_valid,
                class_logits=logits,
                box_deltas=deltas,
            )
        return dets

    # --- training ----------------------------------------------------------------------
    def losses(self, batch, key):
        """The training losses (`loss_names(cfg)`) and the sampling statistics of a batch.

        Args:
          batch: the input pipeline's dict (`frcnn_jax.data`): image [B, H, W, 3]
            normalised canvas, image_size [B, 2], boxes [B, G, 4] (canvas pixels),
            labels [B, G] int32, gt_valid [B, G], is_crowd [B, G]. Crowd boxes are
            ignored (treated as absent ground truth). A mask model (`cfg.mask.enabled`)
            also needs gt_masks [B, G, S, S] uint8 and gt_mask_boxes [B, G, 4] float32
            (`data.masks`: each ground truth's mask cropped to its crop box).
          key: PRNG key for the two samplers (split RPN / ROI heads, then per image).
        Returns:
          (losses {loss_names(cfg): float32 scalar}, stats {STAT_NAMES: scalar per-image means}).
        """
        images, sizes = batch["image"], batch["image_size"]
        canvas_hw = images.shape[1:3]
        gt_boxes = batch["boxes"].astype(jnp.float32)
        gt_valid = batch["gt_valid"] & ~batch["is_crowd"]
        k_rpn, k_roi = jax.random.split(key)

        feats = self.features(images)
        objectness, deltas = self.rpn(feats)
        anchors = rpn_anchors(self.cfg, canvas_hw, feats)
        loss_obj, loss_rpn_box, positives = rpn_losses(self.cfg, objectness, deltas, anchors, gt_boxes, gt_valid, k_rpn)
        props, _, prop_valid = rpn_proposals(self.cfg, objectness, deltas, anchors, sizes, train=True)
        gt_masks = None
        if self.cfg.mask.enabled:
            gt_masks = {"crops": batch["gt_masks"], "boxes": batch["gt_mask_boxes"], "image_size": sizes}
        roi_losses, foreground = self.roi_heads.losses(
            feats, props, prop_valid, gt_boxes, batch["labels"], gt_valid, canvas_hw, k_roi, gt_masks
        )

        def mean(count):
            return jnp.mean(count.astype(jnp.float32))

        losses = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_rpn_box, **roi_losses}
        assert tuple(losses) == loss_names(self.cfg), tuple(losses)
        stats = (mean(positives), mean(foreground), mean(jnp.sum(prop_valid, axis=1)))
        return losses, dict(zip(STAT_NAMES, stats, strict=True))


def init_variables(model: FasterRCNN, rng, canvas_hw=(64, 64)):
    """Random variables {"params", "frozen"} for `model` (their shapes do not depend on the canvas).

    Runs every module once on a tiny canvas and a single box, not the full inference.
    """
    images = jnp.zeros((1, *canvas_hw, 3), jnp.float32)
    boxes = jnp.array([[[0.0, 0.0, canvas_hw[1] / 2, canvas_hw[0] / 2]]], jnp.float32)

    def touch_all(module: FasterRCNN, images, boxes):
        feats = module.features(images)
        module.rpn(feats)
        out = module.roi_heads(feats, boxes, images.shape[1:3])
        if module.cfg.mask.enabled:  # roi_heads/mask_head (FPN), roi_heads/mask_predictor
            ones = jnp.ones(boxes.shape[:2], jnp.int32)
            module.roi_heads.masks(feats, boxes, ones, ones > 0, images.shape[1:3])
        return out

    return jax.jit(lambda r: model.init(r, images, boxes, method=touch_all))(rng)
