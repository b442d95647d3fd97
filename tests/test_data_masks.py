"""Instance masks through the data pipeline: decoding, shapes' visible masks, crops, batches, errors."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from conftest import REPO
from frcnn_jax.data import BATCH_KEYS, CocoJsonSource, ShapesDataset, build_iterator, validate_example
from frcnn_jax.data import masks as M
from frcnn_jax.data import transforms as T


def _uncompressed(mask):
    """COCO's uncompressed RLE of a binary mask (column-major runs, starting with zeros)."""
    flat = np.asarray(mask, np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], change]))
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def test_polygons_rle_and_compressed_rle_decode():
    h, w = 40, 50
    two_parts = [[2, 2, 12, 2, 12, 12, 2, 12], [30.5, 20, 45, 20, 45, 35, 30.5, 35]]
    rle = M.segmentation_to_rle(two_parts, h, w)
    got = M.decode_rles([rle], h, w)[0]
    np.testing.assert_array_equal(got, mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(two_parts, h, w))))
    assert got[:15, :15].sum() > 80 and got[18:, 28:].sum() > 150 and got[15:18].sum() == 0  # both parts
    mask = (np.random.default_rng(0).random((h, w)) < 0.4).astype(np.uint8)
    mask[0, 0] = 1  # a mask starting with a one: the first run is 0
    uncompressed = _uncompressed(mask)
    assert uncompressed["counts"][0] == 0
    np.testing.assert_array_equal(M.decode_rles([M.segmentation_to_rle(uncompressed, h, w)], h, w)[0], mask)
    compressed = mask_utils.encode(np.asfortranarray(mask))
    as_json = {"size": compressed["size"], "counts": compressed["counts"].decode()}  # str, as in a JSON file
    np.testing.assert_array_equal(M.decode_rles([M.segmentation_to_rle(as_json, h, w)], h, w)[0], mask)
    assert M._compressed_rle_total(compressed["counts"]) == h * w
    assert M.decode_rles([], h, w).shape == (0, h, w)


@pytest.mark.parametrize(
    "segmentation, match",
    [
        ([], "non-empty"),
        ([[1, 2, 3, 4]], "even number >= 6"),
        ([[1, 2, 3, 4, 5, 6, 7]], "even number >= 6"),
        ([[1, 2, 3, float("nan"), 5, 6]], "finite"),
        ({"size": [10, 10], "counts": [1, 2, 3]}, "summing to h \\* w"),
        ({"size": [11, 10], "counts": [110]}, "differs from the image"),
        ({"size": [10, 10], "counts": ""}, "sum to 0"),
        ({"size": [10, 10], "counts": "99"}, "sum to"),
        ({"size": [10, 10], "counts": "\x7f"}, "invalid character"),
        ({"counts": [100]}, "polygons or an RLE dict"),
        ("abc", "polygons or an RLE dict"),
    ],
)
def test_undecodable_segmentations(segmentation, match):
    with pytest.raises(ValueError, match=match):
        M.segmentation_to_rle(segmentation, 10, 10)


def test_nearest_resize_equals_torch(torch):
    rng = np.random.default_rng(0)
    masks = (rng.random((3, 37, 53)) < 0.5).astype(np.uint8)
    for out_hw in ((37, 53), (74, 106), (60, 85), (20, 31), (800, 1146)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=out_hw)[:, 0].byte()
        np.testing.assert_array_equal(M.resize_masks_nearest(masks, out_hw), ref.numpy())


def test_crops_are_torchvision_roi_align_of_the_resized_flipped_masks(torch, torchvision):
    """The crop is roi_align of torchvision's resized (and flipped) mask over the crop box, to uint8 rounding."""
    h, w = 50, 70
    masks = np.zeros((4, h, w), np.uint8)
    masks[0, 5:20, 10:40] = 1
    masks[1, :10, :12] = 1  # touches the top-left corner
    masks[2, h - 7 :, w - 9 :] = 1  # bottom-right corner
    masks[3, 30:33, 20] = 1  # one column wide
    for out_hw, flip, s in (
        ((83, 117), False, 112),
        ((83, 117), True, 112),
        ((25, 35), True, 28),
        ((50, 70), False, 16),
    ):
        resized = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=out_hw)[:, 0]
        if flip:
            resized = resized.flip(-1)
        crops, boxes = M.crop_instance_masks(masks, out_hw, flip, s)
        rois = torch.cat([torch.arange(4)[:, None].float(), torch.from_numpy(boxes)], 1)
        ref = torchvision.ops.roi_align(resized[:, None], rois, (s, s), 1.0, -1, False)[:, 0].numpy()
        np.testing.assert_allclose(crops / 255.0, ref, atol=0.5 / 255 + 1e-6)
        # The one-bin border is zero: the whole mask lies inside the crop box.
        assert not crops[:, [0, -1]].any() and not crops[:, :, [0, -1]].any()
        assert np.all(crops.reshape(4, -1).max(1) > 0)


def test_empty_mask_gives_a_zero_crop_at_its_box():
    masks = np.zeros((2, 20, 20), np.uint8)
    masks[1, 3:6, 3:6] = 1
    crops, boxes = M.crop_instance_masks(
        masks, (20, 20), False, 8, fallback_boxes=np.array([[1, 2, 3, 4], [0, 0, 1, 1]])
    )
    assert not crops[0].any() and crops[1].any()
    np.testing.assert_array_equal(boxes[0], [1, 2, 3, 4])


def test_shapes_masks_are_the_visible_pixels():
    ds = ShapesDataset("train", seed=3, num_images=60, masks=True)
    occluded = 0
    for i in range(len(ds)):
        ex = ds[i]
        validate_example(ex, ds.num_object_classes)
        masks = ex["masks"].astype(bool)
        _, owner = ds.render_with_masks(i)
        assert masks.sum(0).max() <= 1  # disjoint
        np.testing.assert_array_equal(masks.any(0), owner >= 0)
        image = ex["image"].astype(np.float32)
        for j, mask in enumerate(masks):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            np.testing.assert_array_equal(ex["boxes"][j], [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
            # Every pixel of the mask shows this shape's colour (pixel noise sigma 3): none was painted over.
            colour = np.median(image[mask], axis=0)
            assert np.abs(image[mask] - colour).max() < 20
            # Pixels inside this shape's box that a LATER shape shows are not in this mask.
            x1, y1, x2, y2 = ex["boxes"][j].astype(int)
            later = owner[y1:y2, x1:x2] > j
            occluded += int(later.any())
            assert not mask[y1:y2, x1:x2][later].any()
    assert occluded > 0  # the property above was exercised
    assert "masks" not in ShapesDataset("train", num_images=2)[0]  # off by default


def test_shapes_coco_gt_has_the_visible_masks_as_segmentations():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ds = ShapesDataset("val", seed=2, num_images=12, masks=True)
    gt = ds.coco_gt()
    plain = ShapesDataset("val", seed=2, num_images=12).coco_gt()
    assert all("segmentation" not in a for a in plain["annotations"])  # box-only ground truth unchanged
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    k = 0
    for i in range(len(ds)):
        ex = ds[i]
        for mask in ex["masks"]:
            ann = gt["annotations"][k]
            assert ann["image_id"] == i and ann["area"] == mask.sum()
            np.testing.assert_array_equal(coco.annToMask(ann), mask)
            k += 1
    assert k == len(gt["annotations"])
    dets = coco.loadRes([dict(a, score=1.0) for a in gt["annotations"]])
    ev = COCOeval(coco, dets, "segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def _pipeline(source, mask_size, **kw):
    args = dict(batch_size=4, canvases=[(160, 160)], min_size=160, max_size=160, max_gt=6, train=True, seed=0)
    args.update(kw)
    return build_iterator(source, mask_size=mask_size, **args)


def test_pipeline_masks_follow_resize_and_flip():
    source = ShapesDataset("train", seed=1, num_images=16, masks=True)
    s = 56
    with _pipeline(source, s) as it, _pipeline(source, 0) as plain:
        flips = 0
        for _ in range(4):
            batch, box_only = next(it), next(plain)
            assert set(box_only) == set(BATCH_KEYS)  # masks off: the box-only batch, unchanged
            assert set(batch) == set(BATCH_KEYS) | {"gt_masks", "gt_mask_boxes"}
            for key in BATCH_KEYS:  # masks on: the same box fields
                np.testing.assert_array_equal(batch[key], box_only[key])
            assert batch["gt_masks"].dtype == np.uint8 and batch["gt_masks"].shape == (4, 6, s, s)
            assert batch["gt_mask_boxes"].dtype == np.float32 and batch["gt_mask_boxes"].shape == (4, 6, 4)
            for i, image_id in enumerate(batch["image_id"]):
                ex = source[int(image_id)]
                n = min(len(ex["boxes"]), 6)
                new_hw = tuple(batch["image_size"][i])
                scaled = T.resize_boxes(ex["boxes"], (128, 128), new_hw)
                flip = not np.allclose(batch["boxes"][i][:n], scaled[:n])
                flips += flip
                crops, boxes = M.crop_instance_masks(ex["masks"][:n], new_hw, flip, s)
                np.testing.assert_array_equal(batch["gt_masks"][i][:n], crops)
                np.testing.assert_array_equal(batch["gt_mask_boxes"][i][:n], boxes)
                assert not batch["gt_masks"][i][n:].any() and not batch["gt_mask_boxes"][i][n:].any()
                # The mask's own pixel box (the crop box less its margins) stays inside its ground-truth
                # box, up to the nearest resize's rounding to whole pixels (< 1 pixel).
                gt = batch["boxes"][i][:n]
                margin = (boxes[:, 2:] - boxes[:, :2]) / s
                tight = np.concatenate([boxes[:, :2] + margin + 1, boxes[:, 2:] - margin], axis=1)
                assert np.all(tight[:, :2] > gt[:, :2] - 1) and np.all(tight[:, 2:] < gt[:, 2:] + 1)
                assert np.all(tight[:, 2:] - tight[:, :2] > 0.8 * (gt[:, 2:] - gt[:, :2]))
        assert flips > 0


def test_pipeline_mask_memory_and_eval_padding():
    source = ShapesDataset("val", num_images=3, masks=True)
    with _pipeline(source, 112, train=False, max_gt=100) as it:
        batch = next(it)
    per_image = M.mask_bytes(100, 112)
    assert per_image == 100 * (112 * 112 + 16) == 1_256_000  # README: 1.26 MB per image
    assert batch["gt_masks"].nbytes + batch["gt_mask_boxes"].nbytes == 4 * per_image
    assert not batch["valid"][3] and not batch["gt_masks"][3].any()  # the padding example


def test_mask_size_needs_a_source_with_masks():
    with pytest.raises(ValueError, match="gives no instance masks"):
        _pipeline(ShapesDataset("train", num_images=4), 112)
    with pytest.raises(ValueError, match="must be >= 3"):
        _pipeline(ShapesDataset("train", num_images=4, masks=True), 2)


def test_data_masks_config_and_the_tfds_error():
    from configs import default
    from frcnn_jax.data import builder

    data = default.get_config().data
    assert data.masks is False and data.mask_size == 112
    data.source, data.masks = "tfds", True
    with pytest.raises(ValueError, match=r"^data.masks=True: the source tfds coco/2017 .* carries no instance masks"):
        builder.validate_data_config(data)
    with pytest.raises(ValueError, match="tfds coco/2017"):
        builder.build_source(data, "train")  # before any tfds data is looked for
    data.source = "shapes"
    builder.validate_data_config(data)
    data.batch_size, data.canvases, data.min_size, data.max_size, data.num_workers = 4, [(128, 128)], (128,), 128, "0"
    source = builder.build_source(data, "train")
    assert source.masks and builder.build_source(data, "val").masks
    with builder.train_iterator(source, data, seed=0, num_hosts=1) as it:
        assert next(it)["gt_masks"].shape == (4, data.max_gt, 112, 112)


@pytest.fixture(scope="module")
def coco128_masks(shared):
    root = shared / "data/coco128"
    path = root / "annotations_original_full.json"
    return CocoJsonSource(path, root / "images", masks=True), path


def test_coco_json_masks_equal_pycocotools(coco128_masks):
    from pycocotools.coco import COCO

    source, path = coco128_masks
    coco = COCO(str(path))
    checked_crowd = checked_multipart = 0
    for index in range(0, len(source), 4):
        image_id = int(source.image_ids[index])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        masks = source.instance_masks(index)
        assert masks.shape == (len(anns),) + source.image_hw(index)
        for mask, ann in zip(masks, anns):
            np.testing.assert_array_equal(mask, coco.annToMask(ann))
            checked_crowd += bool(ann["iscrowd"])
            checked_multipart += isinstance(ann["segmentation"], list) and len(ann["segmentation"]) > 1
    assert checked_crowd and checked_multipart
    ex = source[0]
    validate_example(ex)
    assert ex["masks"].shape[0] == len(ex["boxes"])
    assert len(source._rle_blob) < 400 * len(source._labels)  # compact: compressed RLE bytes


def _tiny_coco(tmp_path, shared, segmentation):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    shutil.copy(shared / "data/coco128/images/000000000009.jpg", img_dir / "000000000009.jpg")
    ann = {"id": 1, "image_id": 9, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0}
    bad = dict(ann, id=77, bbox=[100, 100, 20, 20])
    if segmentation is not None:
        bad["segmentation"] = segmentation
    data = {
        "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480}],
        "annotations": [dict(ann, segmentation=[[10, 20, 40, 20, 40, 60, 10, 60]]), bad],
        "categories": [{"id": 3, "name": "car"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, img_dir


@pytest.mark.parametrize("segmentation", [[[1, 2, 3, 4]], {"size": [480, 640], "counts": "0"}, None])
def test_bad_segmentation_names_the_annotation_and_file(tmp_path, shared, segmentation):
    path, img_dir = _tiny_coco(tmp_path, shared, segmentation)
    with pytest.raises(ValueError, match=rf"^{path}: annotation id 77 \(image id 9\)"):
        CocoJsonSource(path, img_dir, masks=True)
    assert len(CocoJsonSource(path, img_dir)) == 1  # without masks the segmentations are not read


def test_bad_segmentation_is_one_error_line_and_nothing_is_written(tmp_path, shared):
    path, img_dir = _tiny_coco(tmp_path, shared, {"size": [480, 640], "counts": [5, 6]})
    workdir = tmp_path / "run"
    cmd = [
        sys.executable, "train.py", f"--workdir={workdir}", "--config=configs/shapes_c4.py",
        "--config.data.source=coco_json", "--config.data.masks=True",
    ] + [f"--config.data.coco_json.{s}_annotations={path}" for s in ("train", "val")] + [
        f"--config.data.coco_json.{s}_images={img_dir}" for s in ("train", "val")
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert errors[0].startswith(f"error: {path}: annotation id 77 (image id 9): segmentation cannot be decoded")
    assert not pathlib.Path(workdir).exists()
