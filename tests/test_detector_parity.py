"""R-50-C4 and R-50-FPN against torchvision with the same (random, calibrated) weights.

Stage by stage, each stage fed the same inputs on both sides:
  1. backbone features and RPN head outputs: relative error <= 1e-4;
  2. proposals from the same RPN head outputs: same boxes (IoU > 0.999), same scores
     (1e-4), at most 1 % mismatched (NMS near-ties);
  3. detections from the same features and proposals: same boxes (IoU > 0.999),
     scores within 1e-4, same labels, at most 1 % mismatched.
End to end (our whole pipeline, `Detector` API included, vs torchvision's `model(images)`)
the comparison is looser, and the test says why: a random-weight detector amplifies
float32 rounding. A proposal box that moves by 1e-5 relative changes the bilinear
samples of its pooled features, and class scores move by ~1e-4; torchvision's own
float32 run differs from its float64 run by as much (measured on this image:
97.5 % of proposals and 88 % of detections match under the strict criteria).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import convert, ops
from frcnn_jax import model_checkpoint as checkpoint
from frcnn_jax.modeling.faster_rcnn import FasterRCNN
from frcnn_jax.modeling.rpn import level_anchors, select_proposals

IMAGE = "000000000009.jpg"  # 480 x 640 -> resized 800 x 1066, canvas 800 x 1088


def _rel(got, ref):
    return float(np.abs(np.asarray(got) - ref).max() / np.abs(ref).max())


def _match_rate(ref_boxes, ref_scores, ref_labels, boxes, scores, labels, score_tol=1e-4, iou_thr=0.999):
    """Fraction of reference detections with a counterpart: IoU > iou_thr, |score diff| <= tol, same label."""
    if len(ref_boxes) == 0:
        return 1.0 if len(boxes) == 0 else 0.0
    iou = np.asarray(ops.box_iou(np.asarray(ref_boxes, np.float32), np.asarray(boxes, np.float32)))
    ok = 0
    for i in range(len(ref_boxes)):
        cand = np.nonzero(iou[i] > iou_thr)[0]
        ok += any(
            abs(scores[j] - ref_scores[i]) <= score_tol and (labels is None or labels[j] == ref_labels[i]) for j in cand
        )
    return ok / len(ref_boxes)


@pytest.fixture(scope="module", params=["c4", "fpn"])
def pair(request, torch, shared, tmp_path_factory):
    """(arch, calibrated torchvision model, our variables/config, preprocessed ImageList, raw image)."""
    from PIL import Image

    from frcnn_jax.testing import torch_reference as tr

    arch = request.param
    image = np.asarray(Image.open(shared / "data" / "coco128" / "images" / IMAGE).convert("RGB"))
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    kwargs = dict(box_score_thresh=0.01, box_detections_per_img=300)
    if arch == "c4":
        model = tr.build_c4(num_classes=81, **kwargs)
    else:
        model = tr.build_fpn(num_classes=91, **kwargs)
    images, _ = model.transform([tensor])
    assert tuple(images.tensors.shape[-2:]) == (800, 1088)
    tr.calibrate(model, images.tensors, seed=1)
    tmp = tmp_path_factory.mktemp(f"parity_{arch}")
    torch.save(model.state_dict(), tmp / "model.pth")
    name = "fasterrcnn_resnet50_c4" if arch == "c4" else "fasterrcnn_resnet50_fpn"
    out = convert.convert(name, tmp / "model.pth", tmp / "ckpt")
    cfg, variables, meta = checkpoint.load_model(out)
    cfg = cfg.updated({"roi_heads.postprocess": {"score_thresh": 0.01, "detections_per_img": 300}})
    with torch.no_grad():
        feats = model.backbone(images.tensors)
        proposals, _ = model.rpn(images, feats)
        detections, _ = model.roi_heads(feats, proposals, images.image_sizes)
    return dict(
        arch=arch, tv=model, cfg=cfg, variables=variables, meta=meta, images=images, image=image, tensor=tensor,
        feats=feats, proposals=proposals, detections=detections, ckpt=out,
    )  # fmt: skip


def test_features_and_rpn_head(pair, torch):
    from frcnn_jax.testing import torch_reference as tr

    m = FasterRCNN(pair["cfg"])
    images = jnp.asarray(pair["images"].tensors.permute(0, 2, 3, 1).numpy())
    feats = jax.jit(lambda v, x: m.apply(v, x, method=FasterRCNN.features))(pair["variables"], images)
    ref_feats = list(pair["feats"].values())
    assert len(feats) == len(ref_feats)
    for got, ref in zip(feats, ref_feats):
        assert _rel(got, ref.permute(0, 2, 3, 1).numpy()) <= 1e-4
    # RPN head on the same (torchvision) features
    tv_feats = [jnp.asarray(f.permute(0, 2, 3, 1).numpy()) for f in ref_feats]
    obj, deltas = jax.jit(lambda v, f: m.apply(v, f, method=lambda m, f: m.rpn(f)))(pair["variables"], tv_feats)
    with torch.no_grad():
        ref_obj, ref_deltas = tr.rpn_head_outputs(pair["tv"], pair["feats"])
    for lvl in range(len(ref_obj)):
        assert _rel(obj[lvl], ref_obj[lvl]) <= 1e-4
        assert _rel(deltas[lvl], ref_deltas[lvl]) <= 1e-4


def test_proposals_from_same_rpn_outputs(pair, torch):
    from frcnn_jax.testing import torch_reference as tr

    cfg = pair["cfg"]
    with torch.no_grad():
        obj, deltas = tr.rpn_head_outputs(pair["tv"], pair["feats"])
    hws = [tuple(f.shape[-2:]) for f in pair["feats"].values()]
    anchors = level_anchors((800, 1088), hws, cfg.level_anchor_sizes(), cfg.anchors.aspect_ratios)
    rpn = cfg.rpn
    fn = jax.jit(
        lambda o, d, s: select_proposals(
            o, d, anchors, s, pre_nms_top_n=rpn.test.pre_nms_top_n, post_nms_top_n=rpn.test.post_nms_top_n,
            nms_thresh=rpn.nms_thresh, min_size=rpn.min_size, score_thresh=rpn.score_thresh,
        )
    )  # fmt: skip
    boxes, scores, valid = fn([o[0] for o in obj], [d[0] for d in deltas], jnp.array(pair["images"].image_sizes[0]))
    boxes, valid = np.asarray(boxes), np.asarray(valid)
    ref = pair["proposals"][0].numpy()
    assert valid.sum() == len(ref) == rpn.test.post_nms_top_n
    # torchvision returns no proposal scores: the kept boxes must coincide, both ways.
    # The rare differences are NMS near-ties: a box whose IoU with a kept box is within
    # float32 rounding of 0.7, or two proposals with equal sigmoid scores.
    iou = np.asarray(ops.box_iou(ref, boxes[valid]))
    assert (iou.max(axis=1) > 0.999).mean() >= 0.99
    assert (iou.max(axis=0) > 0.999).mean() >= 0.99


def test_detections_from_same_features_and_proposals(pair, torch):
    from frcnn_jax.modeling.postprocess import postprocess_detections

    cfg = pair["cfg"]
    m = FasterRCNN(cfg)
    feats = [jnp.asarray(f.permute(0, 2, 3, 1).numpy()) for f in pair["feats"].values()]
    props = jnp.asarray(pair["proposals"][0].numpy())[None]
    size = jnp.array(pair["images"].image_sizes[0])

    def run(v, f, p):
        logits, deltas = m.apply(v, f, p, (800, 1088), method=lambda m, f, p, hw: m.roi_heads(f, p, hw))
        return postprocess_detections(
            logits[0], deltas[0], p[0], jnp.ones(p.shape[1], bool), size,
            bbox_reg_weights=cfg.roi_heads.bbox_reg_weights, **dataclasses.asdict(cfg.roi_heads.postprocess),
        )  # fmt: skip

    out = jax.device_get(jax.jit(run)(pair["variables"], feats, props))
    ref = {k: v.numpy() for k, v in pair["detections"][0].items()}
    v = out["valid"]
    assert len(ref["boxes"]) >= 100, "weights should give many detections"
    rate = _match_rate(ref["boxes"], ref["scores"], ref["labels"], out["boxes"][v], out["scores"][v], out["labels"][v])
    back = _match_rate(out["boxes"][v], out["scores"][v], out["labels"][v], ref["boxes"], ref["scores"], ref["labels"])
    assert rate >= 0.99 and back >= 0.99, (rate, back)


def test_end_to_end_detector_matches_torchvision(pair, torch):
    """Our Detector API (host preprocessing, one jitted forward, rescaling) vs `model([image])`."""
    from frcnn_jax.detector import Detector

    det = Detector(pair["cfg"], pair["variables"], class_names=pair["meta"]["class_names"])
    ours = det(pair["image"])
    with torch.no_grad():
        ref = pair["tv"]([pair["tensor"]])[0]
    ref = {k: v.numpy() for k, v in ref.items()}
    assert ours["boxes"].shape[0] > 100
    # Final boxes are in original 480 x 640 pixels on both sides.
    assert ours["boxes"][:, 2].max() <= 640 + 1e-3 and ours["boxes"][:, 3].max() <= 480 + 1e-3
    strict = _match_rate(ref["boxes"], ref["scores"], ref["labels"], ours["boxes"], ours["scores"], ours["labels"])
    loose = _match_rate(
        ref["boxes"], ref["scores"], ref["labels"], ours["boxes"], ours["scores"], ours["labels"],
        score_tol=2e-3, iou_thr=0.99,
    )  # fmt: skip
    print(f"\n{pair['arch']} end to end: strict match {strict:.3f}, loose (IoU > 0.99, scores 2e-3) {loose:.3f}")
    # Strict agreement end to end is float32 noise amplified by random weights (see the
    # module docstring); at the looser tolerance every detection must have its twin.
    assert loose >= 0.97, loose
