"""How close the S x S crop targets come to torchvision's `project_masks_on_boxes`, on coco128's polygons.

    python benchmarks/mask_target_fidelity.py [--annotations=FILE] [--crop_size=112] [--mask_size=28]
    python benchmarks/mask_target_fidelity.py --smoke    # 4 images, 1 jitter (the test suite runs it)

For every non-crowd annotation of the COCO JSON (coco128's original annotations by
default; only the images' sizes are read, never their pixels): the mask is decoded with
pycocotools, resized like the training pipeline (short side 800, long side <= 1333,
torchvision's nearest resize) and, for every other image, flipped; its ROIs are its
ground-truth box and `--jitters` boxes jittered like proposals (each coordinate moved by
N(0, 0.1 x size), kept when IoU >= 0.5 with the box, the foreground threshold). Targets:
torchvision's `project_masks_on_boxes` on the full-resolution masks (the reference) and
`frcnn_jax.modeling.mask_head.mask_targets` on the host crops of `frcnn_jax.data.masks`.
Printed: the mean absolute difference over all targets' pixels, its worst ROI, and the
IoU of the targets thresholded at 0.5 (all ROIs' pixels pooled, and the per-ROI mean).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ANNOTATIONS = REPO.parent / "shared" / "data" / "coco128" / "annotations_original_full.json"


def jittered_rois(box, rng, count: int):
    """[1 + count', 4] the box itself and up to `count` jittered copies with IoU >= 0.5."""
    from frcnn_jax.host_boxes import iou_one_to_many

    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    out = [np.asarray(box, np.float32)]
    for _ in range(count):
        cand = np.asarray(box, np.float64) + rng.normal(0.0, 0.1, 4) * np.array([w, h, w, h])
        if cand[2] - cand[0] < 1 or cand[3] - cand[1] < 1:
            continue
        if iou_one_to_many(cand, np.asarray([box], np.float64))[0] >= 0.5:
            out.append(cand.astype(np.float32))
    return np.stack(out)


def measure(annotations=DEFAULT_ANNOTATIONS, *, crop_size=112, mask_size=28, jitters=4, max_images=0, seed=0):
    """Returns a dict: rois, mad, worst_roi_mad, iou_pooled, iou_mean_per_roi (see module doc)."""
    import jax
    import torch
    import torchvision

    from frcnn_jax.data import masks as host_masks
    from frcnn_jax.data.transforms import hflip, resize_boxes, resized_hw
    from frcnn_jax.modeling import mask_head as mt

    data = json.loads(pathlib.Path(annotations).read_text())
    per_image = {}
    for ann in data["annotations"]:
        if not ann.get("iscrowd", 0) and ann["bbox"][2] > 0 and ann["bbox"][3] > 0:
            per_image.setdefault(ann["image_id"], []).append(ann)
    images = [im for im in data["images"] if im["id"] in per_image]
    if max_images:
        images = images[:max_images]
    rng = np.random.default_rng(seed)
    targets_fn = jax.jit(mt.mask_targets, static_argnames="mask_size")
    diffs, inter, union, per_roi_iou, per_roi_mad = [], 0, 0, [], []
    for n, im in enumerate(images):
        h0, w0 = int(im["height"]), int(im["width"])
        anns = per_image[im["id"]]
        rles = [host_masks.segmentation_to_rle(a["segmentation"], h0, w0) for a in anns]
        full0 = host_masks.decode_rles(rles, h0, w0)
        new_hw = resized_hw(h0, w0, 800, 1333)
        flip = bool(n % 2)
        boxes0 = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                           for a in anns], np.float32)  # fmt: skip
        boxes = resize_boxes(boxes0, (h0, w0), new_hw)
        full = host_masks.resize_masks_nearest(full0, new_hw)
        if flip:
            full = full[:, :, ::-1]
            boxes = hflip(np.zeros((new_hw[0], new_hw[1], 1)), boxes)[1]
        crops, crop_boxes = host_masks.crop_instance_masks(full0, new_hw, flip, crop_size, fallback_boxes=boxes)
        rois, matched = [], []
        for g, box in enumerate(boxes):
            r = jittered_rois(box, rng, jitters)
            rois.append(r)
            matched += [g] * len(r)
        rois, matched = np.concatenate(rois), np.asarray(matched, np.int32)
        ref = torchvision.ops.roi_align(
            torch.from_numpy(np.ascontiguousarray(full))[:, None].float(),
            torch.cat([torch.from_numpy(matched)[:, None].float(), torch.from_numpy(rois)], 1),
            (mask_size, mask_size), 1.0,
        )[:, 0].numpy()  # fmt: skip
        # Static shapes for the jitted function: pad ROIs to a multiple of 64, ground truth to 100.
        p = max(128, 1 << (len(rois) - 1).bit_length())  # few compiled shapes
        g_pad = 100
        pad_rois = np.zeros((1, p, 4), np.float32)
        pad_rois[0, : len(rois)] = rois
        pad_matched = np.zeros((1, p), np.int32)
        pad_matched[0, : len(rois)] = matched
        pad_valid = np.zeros((1, p), bool)
        pad_valid[0, : len(rois)] = True
        padded = host_masks.pad_masks(crops, crop_boxes, g_pad)
        got = targets_fn(
            pad_rois, pad_matched, pad_valid, padded["gt_masks"][None], padded["gt_mask_boxes"][None],
            np.asarray([new_hw], np.int32), mask_size=mask_size,
        )  # fmt: skip
        got = np.asarray(got)[0, : len(rois)]
        d = np.abs(got - ref)
        diffs.append(d.reshape(len(rois), -1))
        per_roi_mad += list(d.reshape(len(rois), -1).mean(1))
        a, b = got >= 0.5, ref >= 0.5
        inter += int((a & b).sum())
        union += int((a | b).sum())
        for i in range(len(rois)):
            u = int((a[i] | b[i]).sum())
            if u:
                per_roi_iou.append((a[i] & b[i]).sum() / u)
    d = np.concatenate(diffs)
    return {
        "images": len(images),
        "rois": int(d.shape[0]),
        "mad": float(d.mean()),
        "max_abs": float(d.max()),
        "worst_roi_mad": float(max(per_roi_mad)),
        "iou_pooled": inter / max(union, 1),
        "iou_mean_per_roi": float(np.mean(per_roi_iou)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--annotations", default=str(DEFAULT_ANNOTATIONS))
    parser.add_argument("--crop_size", type=int, default=112, help="S, the host crop size")
    parser.add_argument("--mask_size", type=int, default=28, help="M, the mask head's output size")
    parser.add_argument("--jitters", type=int, default=4, help="jittered ROIs per ground-truth box")
    parser.add_argument("--max_images", type=int, default=0, help="0: all")
    parser.add_argument("--smoke", action="store_true", help="4 images, 1 jittered ROI per box")
    args = parser.parse_args(argv)
    if args.smoke:
        args.max_images, args.jitters = 4, 1
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _timing import machine_line, print_table

    result = measure(
        args.annotations, crop_size=args.crop_size, mask_size=args.mask_size, jitters=args.jitters,
        max_images=args.max_images,
    )  # fmt: skip
    print(json.dumps({"crop_size": args.crop_size, "mask_size": args.mask_size, **result}))
    print_table(
        f"Mask-target fidelity: S x S host crops vs torchvision project_masks_on_boxes; {machine_line()}",
        ["S", "M", "images", "ROIs", "mean abs diff", "worst ROI MAD", "IoU pooled", "IoU per-ROI mean"],
        [[args.crop_size, args.mask_size, result["images"], result["rois"], f"{result['mad']:.4f}",
          f"{result['worst_roi_mad']:.4f}", f"{result['iou_pooled']:.4f}", f"{result['iou_mean_per_roi']:.4f}"]],
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
