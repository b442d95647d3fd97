"""COCO-JSON source: coco128 counts, category mapping, boxes, ground truth, and the bad-input policy."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.categories import COCO_CATEGORY_IDS
from frcnn_jax.data import CocoJsonSource, validate_example


@pytest.fixture(scope="module")
def coco128(shared):
    root = shared / "data/coco128"
    return CocoJsonSource(root / "annotations.json", root / "images"), json.loads(
        (root / "annotations.json").read_text()
    )


def test_coco128_counts_and_empty_images(coco128):
    source, raw = coco128
    assert len(source) == 128
    targets = [source.targets(i) for i in range(len(source))]
    crowd = np.concatenate([t["is_crowd"] for t in targets])
    assert len(crowd) == 939 and crowd.sum() == 10
    annotated = {a["image_id"] for a in raw["annotations"]}
    empty = [int(i) for i in source.image_ids if int(i) not in annotated]
    assert len(empty) == 2
    for image_id in empty:
        row = int(np.flatnonzero(source.image_ids == image_id)[0])
        ex = source[row]
        assert ex["boxes"].shape == (0, 4) and ex["labels"].shape == (0,)
        validate_example(ex, 80)
    assert source.stats == {"dropped": 0, "clipped": 0}


def test_coco128_category_mapping(coco128):
    source, raw = coco128
    assert source.num_object_classes == 80
    assert list(source.label_to_category_id.values()) == list(COCO_CATEGORY_IDS)  # sorted ids, gaps kept
    assert source.category_names[0] == "person" and source.category_names[-1] == "toothbrush"
    for label, cid in source.label_to_category_id.items():
        assert source.category_id_to_label[cid] == label
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert all(source.category_names[label - 1] == names[cid] for label, cid in source.label_to_category_id.items())


def test_coco128_boxes_equal_json(coco128):
    source, raw = coco128
    by_image = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for row, image_id in enumerate(source.image_ids.tolist()):
        anns = by_image.get(image_id, [])
        t = source.targets(row)
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        np.testing.assert_array_equal(t["boxes"], expected)
        np.testing.assert_array_equal(t["labels"], [source.category_id_to_label[a["category_id"]] for a in anns])
        np.testing.assert_array_equal(t["is_crowd"], [bool(a["iscrowd"]) for a in anns])
    ex = source[0]
    im = raw["images"][0]
    assert ex["image"].shape == (im["height"], im["width"], 3) and ex["image"].dtype == np.uint8
    assert ex["image_id"] == im["id"]
    validate_example(ex, 80)


def test_coco_gt_is_the_file_content(coco128, shared):
    source, raw = coco128
    assert source.coco_gt() == raw


# ---------------------------------------------------------------------------------------
# Bad input, built in tmp_path.


def _write(tmp_path, data, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _tiny(tmp_path, shared, annotations=None, images=None, categories=None):
    """A 2-image dataset (copies of coco128 photos) with editable annotations."""
    src = shared / "data/coco128/images"
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for name in ("000000000009.jpg", "000000000025.jpg"):
        shutil.copy(src / name, img_dir / name)
    data = {
        "images": images
        if images is not None
        else [
            {"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480},
            {"id": 25, "file_name": "000000000025.jpg", "width": 640, "height": 426},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 9, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        ],
        "categories": categories if categories is not None else [{"id": 3, "name": "car"}, {"id": 1, "name": "person"}],
    }
    return _write(tmp_path, data), img_dir


def test_tiny_dataset_and_category_order(tmp_path, shared):
    ann, img_dir = _tiny(tmp_path, shared)
    source = CocoJsonSource(ann, img_dir)
    assert source.category_names == ["person", "car"] and source.label_to_category_id == {1: 1, 2: 3}
    ex = source[0]
    np.testing.assert_array_equal(ex["boxes"], [[10, 20, 40, 60]])
    assert ex["labels"].tolist() == [2] and ex["image"].shape == (480, 640, 3)
    assert len(source[1]["boxes"]) == 0


def test_missing_and_corrupt_images(tmp_path, shared):
    ann, img_dir = _tiny(tmp_path, shared)
    (img_dir / "000000000025.jpg").unlink()
    source = CocoJsonSource(ann, img_dir)
    with pytest.raises(FileNotFoundError, match=r"000000000025\.jpg.*image id 25"):
        source[1]
    (img_dir / "000000000025.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode image file .*000000000025\.jpg \(image id 25\)"):
        source[1]
    Image.new("RGB", (10, 10)).save(img_dir / "000000000025.jpg")
    with pytest.raises(ValueError, match=r"000000000025\.jpg.*\(10, 10\).*\(426, 640\)"):
        source[1]


def test_degenerate_boxes_dropped_and_outside_boxes_clipped(tmp_path, shared, caplog):
    anns = [
        {"id": 1, "image_id": 9, "category_id": 1, "bbox": [10, 20, 0, 40], "iscrowd": 0},  # w = 0
        {"id": 2, "image_id": 9, "category_id": 1, "bbox": [10, 20, 30, -1], "iscrowd": 0},  # h < 0
        {"id": 3, "image_id": 9, "category_id": 1, "bbox": [-5, 470, 30, 20], "iscrowd": 0},  # partly outside
        {"id": 4, "image_id": 9, "category_id": 1, "bbox": [700, 10, 30, 20], "iscrowd": 0},  # fully outside
        {"id": 5, "image_id": 9, "category_id": 3, "bbox": [1, 2, 3, 4], "iscrowd": 1},
    ]
    ann, img_dir = _tiny(tmp_path, shared, annotations=anns)
    with caplog.at_level(logging.WARNING, logger="frcnn_jax.data.coco_json"):
        source = CocoJsonSource(ann, img_dir)
    assert source.stats == {"dropped": 3, "clipped": 1}
    assert "dropped 3 boxes" in caplog.text and "annotation id 1" in caplog.text
    assert "clipped 1 boxes" in caplog.text and "annotation id 3" in caplog.text
    t = source.targets(0)
    np.testing.assert_array_equal(t["boxes"], [[0, 470, 25, 480], [1, 2, 4, 6]])
    np.testing.assert_array_equal(t["is_crowd"], [False, True])
    assert source.coco_gt()["annotations"] == anns  # ground truth stays the file's


def test_grayscale_cmyk_and_exif_orientation(tmp_path, shared):
    photo = Image.open(shared / "data/coco128/images/000000000009.jpg")
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    photo.convert("L").save(img_dir / "gray.jpg")
    photo.convert("CMYK").save(img_dir / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": must NOT be applied
    photo.save(img_dir / "exif.jpg", exif=exif)
    images = [
        {"id": i, "file_name": n, "width": 640, "height": 480}
        for i, n in enumerate(["gray.jpg", "cmyk.jpg", "exif.jpg"])
    ]
    source = CocoJsonSource(
        _write(tmp_path, {"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}), img_dir
    )
    for i in range(3):
        ex = source[i]
        assert ex["image"].shape == (480, 640, 3) and ex["image"].dtype == np.uint8
    gray = source[0]["image"]
    assert np.array_equal(gray[..., 0], gray[..., 1])


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "is empty"),
        ("   \n", "is empty"),
        ('{"images": [', "malformed JSON"),
        ("[1, 2]", "top level is a list"),
        (json.dumps({"images": [], "annotations": []}), "missing required key 'categories'"),
        (json.dumps({"images": [], "categories": []}), "missing required key 'annotations'"),
    ],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as e:
        CocoJsonSource(path, tmp_path)
    assert str(path) in str(e.value)


def test_bad_entries(tmp_path, shared):
    def error(**kwargs):
        ann, img_dir = _tiny(tmp_path, shared, **kwargs)
        with pytest.raises(ValueError) as e:
            CocoJsonSource(ann, img_dir)
        assert str(ann) in str(e.value)
        return str(e.value)

    msg = error(annotations=[{"id": 77, "image_id": 9, "category_id": 12, "bbox": [1, 2, 3, 4]}])
    assert "annotation id 77" in msg and "unknown category_id 12" in msg
    msg = error(annotations=[{"id": 78, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4]}])
    assert "annotation id 78" in msg and "unknown image_id 5" in msg
    msg = error(annotations=[{"id": 79, "image_id": 9, "category_id": 1}])
    assert "annotation id 79" in msg and "'bbox'" in msg
    msg = error(annotations=[{"id": 80, "image_id": 9, "category_id": 1, "bbox": [1, 2, float("nan"), 4]}])
    assert "annotation id 80" in msg and "invalid bbox" in msg
    msg = error(annotations=[{"id": 81, "image_id": 9, "category_id": 1, "bbox": [1, 2, 3]}])
    assert "annotation id 81" in msg and "invalid bbox" in msg
    msg = error(images=[{"id": 9, "file_name": "000000000009.jpg", "width": 640}])
    assert "image id 9" in msg and "'height'" in msg
    msg = error(categories=[{"id": 1}])
    assert "category id 1" in msg and "'name'" in msg
    msg = error(images=[{"id": 9, "file_name": "a.jpg", "width": 1, "height": 1}] * 2, annotations=[])
    assert "duplicate image id 9" in msg


def test_missing_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        CocoJsonSource(tmp_path / "nope.json", tmp_path)
