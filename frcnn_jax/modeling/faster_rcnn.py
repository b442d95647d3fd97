"""Faster R-CNN: backbone -> RPN -> ROI pooling -> box head -> detections.

A thin composition of the modules and pure functions beside it. The parameter tree
mirrors torchvision's module names (`backbone/body/...`, `backbone/fpn/...`,
`rpn/head/...`, `roi_heads/box_head/...`, `roi_heads/box_predictor/...`), and frozen
batch-norm statistics live in the `"frozen"` collection:

    variables = model.init(rng, images, image_sizes)          # {"params", "frozen"}
    detections = model.apply(variables, images, image_sizes)

Everything runs under one `jax.jit` with static shapes: images [B, H, W, 3] on a
fixed canvas, `image_sizes` [B, 2] the true (h, w) of each resized image inside it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from frcnn_jax.modeling.box_head import FastRCNNPredictor, Res5Head, TwoMLPHead
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.fpn import FPN
from frcnn_jax.modeling.poolers import pool_rois
from frcnn_jax.modeling.postprocess import postprocess_detections
from frcnn_jax.modeling.resnet import ResNet
from frcnn_jax.modeling.rpn import RPNHead, level_anchors, select_proposals


def _dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


class Backbone(nn.Module):
    """C4: ResNet stem + layer1-3 -> [C4 (stride 16)]; FPN: ResNet + FPN -> [P2, ..., P6]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, images):
        cfg = self.cfg
        body = ResNet(
            depth=cfg.depth,
            width=cfg.width,
            num_stages=3 if cfg.arch == "c4" else 4,
            stride_in_1x1=cfg.stride_in_1x1,
            freeze_at=cfg.freeze_at,
            bn_eps=cfg.bn_eps,
            dtype=_dtype(cfg),
            zero_init_residual=cfg.zero_init_residual,
            remat=cfg.remats("resnet"),
            name="body",
        )
        outs = body(images)
        if cfg.arch == "c4":
            return [outs["layer3"]]
        fpn = FPN(cfg.fpn_channels, dtype=_dtype(cfg), remat=cfg.remats("fpn"), name="fpn")
        return fpn([outs[f"layer{i}"] for i in range(1, 5)])


class RPN(nn.Module):
    """Holds the RPN head (parameters at `rpn/head`)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.head = RPNHead(cfg.num_anchors_per_location, dtype=_dtype(cfg), remat=cfg.remats("rpn_head"))

    def __call__(self, features):
        return self.head(features)


class RoIHeads(nn.Module):
    """Box head + predictor: pooled [R, S, S, C] -> logits [R, K], deltas [R, K, 4]."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        if cfg.arch == "c4":
            self.box_head = Res5Head(
                cfg.depth, cfg.width, cfg.stride_in_1x1, cfg.bn_eps, dtype=_dtype(cfg),
                zero_init_residual=cfg.zero_init_residual, remat=cfg.remats("box_head"),
            )  # fmt: skip
        else:
            self.box_head = TwoMLPHead(cfg.representation_size, dtype=_dtype(cfg), remat=cfg.remats("box_head"))
        self.box_predictor = FastRCNNPredictor(cfg.num_classes, dtype=_dtype(cfg))

    def __call__(self, pooled):
        return self.box_predictor(self.box_head(pooled))


class FasterRCNN(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.backbone = Backbone(self.cfg)
        self.rpn = RPN(self.cfg)
        self.roi_heads = RoIHeads(self.cfg)

    # --- stages, usable on their own (training composes them differently) -----------
    def features(self, images):
        """[B, H, W, 3] normalised canvas -> list of NHWC feature maps (RPN levels)."""
        return self.backbone(images)

    def rpn_outputs(self, features):
        """-> (objectness: per level [B, N_l], deltas: per level [B, N_l, 4])."""
        return self.rpn(features)

    def proposals(self, features, objectness, deltas, image_sizes, canvas_hw, *, train: bool):
        """-> boxes [B, P, 4], scores [B, P], valid [B, P] (P = post-NMS top-n, static)."""
        cfg = self.cfg
        anchors = level_anchors(
            canvas_hw, [f.shape[1:3] for f in features], cfg.level_anchor_sizes(), cfg.aspect_ratios
        )
        fn = functools.partial(
            select_proposals,
            anchors=anchors,
            pre_nms_top_n=cfg.rpn_pre_nms_top_n_train if train else cfg.rpn_pre_nms_top_n_test,
            post_nms_top_n=cfg.rpn_post_nms_top_n_train if train else cfg.rpn_post_nms_top_n_test,
            nms_thresh=cfg.rpn_nms_thresh,
            min_size=cfg.rpn_min_size,
            score_thresh=cfg.rpn_score_thresh,
        )
        return jax.vmap(lambda o, d, s: fn(o, d, image_size=s))(objectness, deltas, image_sizes)

    def box_predictions(self, features, boxes, canvas_hw):
        """Pool `boxes` [B, P, 4] and run the box head -> logits [B, P, K], deltas [B, P, K, 4]."""
        cfg = self.cfg
        b, p, _ = boxes.shape
        pooled = pool_rois(
            features if cfg.arch == "c4" else features[:4],
            boxes,
            canvas_hw,
            output_size=cfg.pooler_resolution,
            sampling_ratio=cfg.pooler_sampling_ratio,
            aligned=cfg.pooler_aligned,
            multiscale=cfg.arch == "fpn",
        )
        logits, deltas = self.roi_heads(pooled.astype(_dtype(cfg)))
        return logits.reshape(b, p, -1), deltas.reshape(b, p, -1, 4)

    # --- inference ---------------------------------------------------------------------
    def __call__(self, images, image_sizes, *, return_intermediates: bool = False):
        """Detections for a batch on one canvas.

        Args:
          images: [B, H, W, 3] float normalised images, zero-padded to the canvas.
          image_sizes: [B, 2] int32 (h, w) of each resized image inside the canvas.
        Returns:
          dict: boxes [B, D, 4] (canvas pixels), scores [B, D], labels [B, D] int32,
          valid [B, D] bool (D = detections_per_img). With `return_intermediates`, also
          features, objectness, rpn_deltas, proposals, proposal_scores, proposal_valid,
          class_logits, box_deltas.
        """
        cfg = self.cfg
        canvas_hw = images.shape[1:3]
        feats = self.features(images)
        objectness, rpn_deltas = self.rpn_outputs(feats)
        props, prop_scores, prop_valid = self.proposals(
            feats, objectness, rpn_deltas, image_sizes, canvas_hw, train=False
        )
        logits, deltas = self.box_predictions(feats, props, canvas_hw)
        post = functools.partial(
            postprocess_detections,
            bbox_reg_weights=cfg.bbox_reg_weights,
            score_thresh=cfg.box_score_thresh,
            nms_thresh=cfg.box_nms_thresh,
            detections_per_img=cfg.detections_per_img,
            min_size=cfg.box_min_size,
        )
        dets = jax.vmap(post)(logits, deltas, props, prop_valid, image_sizes)
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


def init_variables(model: FasterRCNN, rng, canvas_hw=(64, 64)):
    """Random variables {"params", "frozen"} for `model` (their shapes do not depend on the canvas).

    Runs every module once on a tiny canvas and a single box, not the full inference.
    """
    images = jnp.zeros((1, *canvas_hw, 3), jnp.float32)
    boxes = jnp.array([[[0.0, 0.0, canvas_hw[1] / 2, canvas_hw[0] / 2]]], jnp.float32)

    def touch_all(module: FasterRCNN, images, boxes):
        feats = module.features(images)
        module.rpn_outputs(feats)
        return module.box_predictions(feats, boxes, images.shape[1:3])

    return jax.jit(lambda r: model.init(r, images, boxes, method=touch_all))(rng)
