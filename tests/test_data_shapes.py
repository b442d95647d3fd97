"""The synthetic shapes dataset: determinism, exact boxes, ranges, placement rules, COCO ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from frcnn_jax.data import ShapesDataset, validate_example
from frcnn_jax.data.shapes import SHAPE_NAMES

N = 150  # images checked by the property tests


@pytest.fixture(scope="module")
def rendered():
    ds = ShapesDataset("train", seed=3, num_images=N)
    return ds, [ds.render_with_masks(i) for i in range(N)]


def test_deterministic_and_splits_differ():
    a, b = ShapesDataset("train", seed=0), ShapesDataset("train", seed=0)
    for i in (0, 7, 4095):
        x, y = a[i], b[i]
        for key in ("image", "boxes", "labels"):
            np.testing.assert_array_equal(x[key], y[key])
        assert x["image_id"] == i
    np.testing.assert_array_equal(a[5]["image"], a[5]["image"])
    val, other_seed = ShapesDataset("val", seed=0), ShapesDataset("train", seed=1)
    assert len(val) == 256 and len(a) == 4096
    for i in range(5):
        assert not np.array_equal(a[i]["image"], val[i]["image"])
        assert not np.array_equal(a[i]["image"], other_seed[i]["image"])


def test_records_valid_and_in_range(rendered):
    ds, items = rendered
    assert ds.num_object_classes == len(ds.category_names) == len(SHAPE_NAMES)
    assert ds.label_to_category_id == {i: i for i in range(1, ds.num_object_classes + 1)}
    counts, all_labels, sizes = [], [], []
    for ex, _ in items:
        validate_example(ex, ds.num_object_classes)
        assert ex["image"].shape == (128, 128, 3)
        b = ex["boxes"]
        assert np.all(b >= 0) and np.all(b[:, [0, 2]] <= 128) and np.all(b[:, [1, 3]] <= 128)
        assert np.array_equal(b, np.round(b))  # pixel-edge coordinates
        counts.append(len(b))
        all_labels += ex["labels"].tolist()
        sizes.append(b[:, 2:] - b[:, :2])
        assert not ex["is_crowd"].any() and not ex["difficult"].any()
    sizes = np.concatenate(sizes)
    assert min(counts) >= 1 and max(counts) <= 5
    assert set(np.bincount(counts)[1:].nonzero()[0] + 1) == {1, 2, 3, 4, 5}
    assert set(all_labels) == set(range(1, ds.num_object_classes + 1))
    assert sizes.max() <= 64 and sizes.min() >= 1
    assert np.percentile(sizes, 10) < 20 and np.percentile(sizes, 90) > 40  # small to large


def test_boxes_are_tight_around_visible_pixels(rendered):
    _, items = rendered
    for ex, instances in items:
        assert instances.shape == (128, 128) and instances.max() == len(ex["boxes"]) - 1
        for j, (x1, y1, x2, y2) in enumerate(ex["boxes"].astype(int)):
            mask = instances == j
            assert mask.sum() >= 16
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == (x1, y1, x2, y2)
            # Each border row/column of the box touches the shape.
            assert mask[y1, x1:x2].any() and mask[y2 - 1, x1:x2].any()
            assert mask[y1:y2, x1].any() and mask[y1:y2, x2 - 1].any()


def test_shapes_differ_from_background(rendered):
    _, items = rendered
    for ex, instances in items[:30]:
        image = ex["image"].astype(np.float32)
        for j in range(len(ex["boxes"])):
            mask = instances == j
            inside = image[mask].mean(0)
            assert np.abs(image[mask] - inside).max() < 40  # a (noisy) solid colour


def test_overlap_limited_and_never_hidden(rendered):
    ds, items = rendered
    for ex, instances in items:
        b = ex["boxes"].astype(np.float64)
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                lt = np.maximum(b[i, :2], b[j, :2])
                rb = np.minimum(b[i, 2:], b[j, 2:])
                inter = np.prod(np.clip(rb - lt, 0, None))
                union = np.prod(b[i, 2:] - b[i, :2]) + np.prod(b[j, 2:] - b[j, :2]) - inter
                assert inter / union <= ds.max_iou + 1e-6
        assert set(np.unique(instances[instances >= 0])) == set(range(len(b)))


def test_options_and_errors():
    ds = ShapesDataset(
        "val",
        num_images=3,
        image_size=(64, 96),
        min_objects=2,
        max_objects=2,
        min_size=8,
        max_size=24,
        classes=("cross", "circle"),
    )
    assert ds.category_names == ["cross", "circle"] and ds.num_object_classes == 2 and len(ds) == 3
    for i in range(3):
        ex = ds[i]
        assert ex["image"].shape == (64, 96, 3) and len(ex["boxes"]) == 2
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset("dev")
    with pytest.raises(ValueError, match="max_size"):
        ShapesDataset(max_size=200)
    with pytest.raises(ValueError, match="classes"):
        ShapesDataset(classes=("hexagon",))


def test_coco_gt_matches_records():
    ds = ShapesDataset("val", num_images=12)
    gt = ds.coco_gt()
    assert [im["id"] for im in gt["images"]] == list(range(12))
    assert all(im["width"] == 128 and im["height"] == 128 for im in gt["images"])
    assert [c["id"] for c in gt["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in gt["categories"]] == list(SHAPE_NAMES)
    anns = gt["annotations"]
    assert len(anns) == sum(len(ds[i]["boxes"]) for i in range(12))
    assert len({a["id"] for a in anns}) == len(anns)
    first = [a for a in anns if a["image_id"] == 0]
    ex = ds[0]
    for a, box, label in zip(first, ex["boxes"], ex["labels"]):
        x1, y1, x2, y2 = box.tolist()
        assert a["bbox"] == [x1, y1, x2 - x1, y2 - y1] and a["category_id"] == label and a["iscrowd"] == 0
        assert a["area"] == (x2 - x1) * (y2 - y1)
