"""COCO instance-mask ("segm") evaluation: frcnn_jax.evaluation against pycocotools run directly.

Expected numbers come from the official fixture's file or from pycocotools' COCOeval run
in the test itself (never hard-coded): the segm evaluation sees the results without
their "bbox" (mask areas), results without "bbox" get their mask's extent as box.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from conftest import REPO
from frcnn_jax import evaluation, host_masks
from frcnn_jax.evaluation import STAT_KEYS, EvaluationInputError, evaluate_coco, to_coco_results_with_masks


def _pycocotools(gt_dataset, results, iou_type):
    """The 12 stats of COCOeval(gt, dt, iou_type) run directly (pycocotools' own API)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(gt_dataset)
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, np.float64)


def _stats(result):
    return np.asarray([result.stats[k] for k in STAT_KEYS], np.float64)


@pytest.fixture(scope="module")
def fixture_files(shared):
    d = shared / "data" / "coco_eval_fixture"
    expected = json.loads((d / "expected_stats_pycocotools.json").read_text())
    return d / "instances_val2014_100.json", d / "instances_val2014_fakesegm100_results.json", expected


@pytest.fixture(scope="module")
def coco128(shared):
    """coco128's full COCO annotations (polygons with several parts, crowd uncompressed RLE)."""
    return json.loads((shared / "data" / "coco128" / "annotations_original_full.json").read_text())


def _gt_as_results(dataset, rng, shift=0, drop=0.0):
    """Results made from the GT masks themselves (compressed RLE, str counts), optionally shifted
    right by `shift` pixels and with a fraction `drop` left out; random scores."""
    gt = COCO()
    gt.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    results = []
    for ann in dataset["annotations"]:
        if rng.random() < drop:
            continue
        m = gt.annToMask(ann)
        if shift:
            m = np.roll(m, shift, axis=1)
            m[:, :shift] = 0
        rle = mask_utils.encode(np.asfortranarray(m))
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": rle,
                "score": float(rng.random()),
            }  # fmt: skip
        )
    return results


def test_official_fake_segm_results_reproduce_pycocotools(fixture_files, tmp_path):
    gt, dt, expected = fixture_files
    result = evaluate_coco(gt, dt)
    assert result.segm is not None and result.segm.iou_type == "segm" and result.iou_type == "bbox"
    np.testing.assert_allclose(_stats(result.segm), expected["segm"], rtol=0, atol=1e-9)
    # top level: bbox of the masks' extents (the file has no "bbox"), as pycocotools computes them
    gt_dataset, results = json.loads(gt.read_text()), json.loads(dt.read_text())
    boxed = [{**r, "bbox": list(mask_utils.toBbox(r["segmentation"]))} for r in results]
    for r in boxed:
        del r["segmentation"]
    np.testing.assert_allclose(_stats(result), _pycocotools(gt_dataset, boxed, "bbox"), rtol=0, atol=1e-12)
    assert result.detections == results  # the evaluated list as read: pycocotools' added keys are not in it
    # metrics.json: bbox numbers at the top level, "segm" with the same keys
    paths = evaluation.write_coco_report(tmp_path, result)
    metrics = json.loads(paths["metrics"].read_text())
    assert [k for k in metrics if k in STAT_KEYS] == list(STAT_KEYS) and set(metrics) == {
        *STAT_KEYS,
        "per_class",
        "segm",
    }
    assert set(metrics["segm"]) == {*STAT_KEYS, "per_class"}
    assert [metrics["segm"][k] for k in STAT_KEYS] == expected["segm"]
    assert metrics["segm"]["per_class"] == result.segm.per_class and metrics["AP"] == result.stats["AP"]
    table = evaluation.format_per_class_table(result.per_class, columns=2, segm=result.segm.per_class)
    assert "box AP" in table.splitlines()[0] and "mask AP" in table.splitlines()[0]
    row = next(line for line in table.splitlines() if line.startswith("person "))
    assert row.split()[1:3] == [f"{result.per_class['person']:.3f}", f"{result.segm.per_class['person']:.3f}"]


def test_box_only_results_have_no_segm(fixture_files):
    gt, _, expected = fixture_files
    result = evaluate_coco(gt, gt.parent / "instances_val2014_fakebbox100_results.json")
    assert result.segm is None and "segm" not in result.metrics()
    np.testing.assert_allclose(_stats(result), expected["bbox"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("shift, drop", [(0, 0.0), (3, 0.2)])
def test_coco128_polygons_equal_pycocotools(coco128, shift, drop):
    """coco128's own masks (polygons, several parts, crowd RLE) as results: perfect, and shifted / partly missing."""
    rng = np.random.default_rng(shift)
    before = copy.deepcopy(coco128)
    results = _gt_as_results(coco128, rng, shift, drop)
    assert sum(isinstance(a["segmentation"], dict) for a in coco128["annotations"]) > 0  # crowd RLE present
    assert any(isinstance(a["segmentation"], list) and len(a["segmentation"]) > 1 for a in coco128["annotations"])
    ours = evaluate_coco(coco128, results)
    np.testing.assert_allclose(_stats(ours.segm), _pycocotools(coco128, results, "segm"), rtol=0, atol=1e-12)
    if shift == 0:  # the GT itself: AP 1 except where pycocotools' crowd / area rules say otherwise
        assert ours.segm.stats["AP50"] > 0.99
    else:
        assert 0.2 < ours.segm.stats["AP"] < 0.95
    # with boxes as well: the segm numbers still use the masks' areas (boxes left out), bbox the boxes
    boxes = [list(mask_utils.toBbox(r["segmentation"])) for r in results]
    both = [{**r, "bbox": [b[0] + 1.0, b[1], b[2], b[3]]} for r, b in zip(results, boxes)]
    ours2 = evaluate_coco(coco128, both)
    np.testing.assert_array_equal(_stats(ours2.segm), _stats(ours.segm))
    box_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in both]
    np.testing.assert_allclose(_stats(ours2), _pycocotools(coco128, box_only, "bbox"), rtol=0, atol=1e-12)
    assert coco128 == before  # the caller's ground truth is not modified (COCOeval rewrites segmentations)


def test_gt_rle_forms_are_all_read(coco128):
    """The same masks as polygons, uncompressed RLE or compressed RLE in the GT give the same numbers."""
    rng = np.random.default_rng(5)
    small = {**coco128, "images": coco128["images"][:20]}
    ids = {im["id"] for im in small["images"]}
    small["annotations"] = [a for a in coco128["annotations"] if a["image_id"] in ids]
    results = _gt_as_results(small, rng, shift=2)
    base = _stats(evaluate_coco(small, results).segm)
    gt = COCO()
    gt.dataset = copy.deepcopy(small)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    compressed = copy.deepcopy(small)
    for ann in compressed["annotations"]:
        rle = gt.annToRLE(ann)
        ann["segmentation"] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(_stats(evaluate_coco(compressed, results).segm), base)


def test_to_coco_results_with_masks_round_trip(fixture_files):
    """Model output -> COCO results with RLE: decode(segmentation) == paste_masks, boxes as to_coco_results."""
    rng = np.random.default_rng(0)
    h, w = 90, 120
    boxes = np.asarray([[10, 5, 60, 40], [0, 0, 120, 90], [100.5, 80.2, 120, 90], [30, 30, 31, 31]], np.float32)
    masks = rng.random((4, 28, 28), dtype=np.float32)
    scores, labels = np.asarray([0.9, 0.8, 0.7, 0.6]), np.asarray([1, 2, 0, 3])  # label 0: padding, dropped
    valid = np.asarray([True, True, True, False])
    res = to_coco_results_with_masks(7, boxes, scores, labels, masks, (h, w), {1: 11, 2: 22, 3: 33}, valid)
    plain = evaluation.to_coco_results([7], [boxes], [scores], [labels], {1: 11, 2: 22, 3: 33}, [valid])
    assert [{k: v for k, v in r.items() if k != "segmentation"} for r in res] == plain
    dense = host_masks.paste_masks(masks[:2], boxes[:2], (h, w))
    assert len(res) == 2 and dense[0].any() and dense[1].any()
    for r, want in zip(res, dense):
        assert r["segmentation"]["size"] == [h, w] and isinstance(r["segmentation"]["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode(r["segmentation"]), want)
    json.dumps(res)  # JSON-ready
    with pytest.raises(ValueError, match=r"masks \(3, 28, 28\) for 4 boxes"):
        to_coco_results_with_masks(7, boxes, scores, labels, masks[:3], (h, w))


def _tiny_gt():
    return {
        "images": [{"id": 1, "width": 8, "height": 6}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 41, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "area": 9, "iscrowd": 0,
             "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]},
            {"id": 42, "image_id": 1, "category_id": 1, "bbox": [0, 0, 8, 6], "area": 48, "iscrowd": 1,
             "segmentation": {"size": [6, 8], "counts": [0, 10, 38]}},
        ],
    }  # fmt: skip


def _tiny_result(**kw):
    m = np.zeros((6, 8), np.uint8, order="F")
    m[1:4, 1:4] = 1
    rle = mask_utils.encode(m)
    return {"image_id": 1, "category_id": 1, "score": 0.5,
            "segmentation": {"size": [6, 8], "counts": rle["counts"].decode()}, **kw}  # fmt: skip


def test_tiny_gt_is_valid_and_scores_one(tmp_path):
    result = evaluate_coco(_tiny_gt(), [_tiny_result()])
    assert result.segm.stats["AP"] == pytest.approx(1.0)
    # in-memory results may hold pycocotools' bytes counts: evaluated alike, written as str
    raw = _tiny_result()
    raw["segmentation"]["counts"] = raw["segmentation"]["counts"].encode()
    result = evaluate_coco(_tiny_gt(), [raw])
    assert result.segm.stats["AP"] == pytest.approx(1.0)
    paths = evaluation.write_coco_report(tmp_path, result)
    assert json.loads(paths["detections"].read_text())[0]["segmentation"] == _tiny_result()["segmentation"]


@pytest.mark.parametrize(
    "ann_id, segmentation, match",
    [
        (41, [[1, 1, 4, 1, 4]], "annotation id 41 .* malformed 'segmentation': polygons"),
        (41, [], "annotation id 41 .* malformed 'segmentation': polygons"),
        (41, "abc", "annotation id 41 .* malformed 'segmentation': a string"),
        (41, None, "annotation id 41 .* has no 'segmentation'"),
        (42, {"size": [6, 8], "counts": [0, 10, 30]}, "annotation id 42 .* summing to height \\* width = 48"),
        (42, {"size": [5, 8], "counts": [0, 10, 30]}, "annotation id 42 .* RLE size \\[5, 8\\] is not the image's"),
        (42, {"size": [6, 8], "counts": 5}, "annotation id 42 .* RLE 'counts' is int"),
    ],
)
def test_malformed_gt_segmentation_names_the_annotation(ann_id, segmentation, match):
    gt = _tiny_gt()
    ann = next(a for a in gt["annotations"] if a["id"] == ann_id)
    if segmentation is None:
        del ann["segmentation"]
    else:
        ann["segmentation"] = segmentation
    with pytest.raises(EvaluationInputError, match=match):
        evaluate_coco(gt, [_tiny_result()])
    evaluate_coco(gt, [{k: v for k, v in _tiny_result(bbox=[1, 1, 3, 3]).items() if k != "segmentation"}])  # bbox only


@pytest.mark.parametrize(
    "results, match",
    [
        ([_tiny_result(), {**_tiny_result(), "segmentation": {"size": [6, 8], "counts": 3}}],
         r"item 1 \(image id 1\) 'segmentation' 'counts' must be a string"),
        ([{**_tiny_result(), "segmentation": {"size": [6, 9], "counts": "abc"}}],
         r"item 0 \(image id 1\) 'segmentation' 'size' \[6, 9\] is not the image's \[height, width\] \[6, 8\]"),
        ([{**_tiny_result(), "segmentation": [[1, 1, 4, 1, 4, 4]]}], "item 0 .* must be a COCO compressed RLE"),
        ([_tiny_result(), _tiny_result(bbox=[1, 1, 3, 3])], "item 1 has 'bbox' but item 0 does not"),
        ([_tiny_result(bbox=[1, 1, 3, 3]), _tiny_result()], "item 1 has no 'bbox' but item 0 does"),
        ([{"image_id": 1, "category_id": 1, "score": 0.5}], "item 0 has neither 'bbox' nor 'segmentation'"),
    ],
)  # fmt: skip
def test_malformed_result_segmentation_is_one_clear_error(results, match):
    with pytest.raises(EvaluationInputError, match=match):
        evaluate_coco(_tiny_gt(), results)


def test_eval_py_segm_and_its_one_line_errors(fixture_files, tmp_path):
    gt, dt, expected = fixture_files
    out = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), f"--annotations={gt}", f"--detections={dt}", f"--out={tmp_path / 'o'}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "COCOeval bbox and segm" in out.stdout and "segm (instance masks):" in out.stdout
    assert "mask AP" in out.stdout
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    np.testing.assert_allclose([metrics["segm"][k] for k in STAT_KEYS], expected["segm"], rtol=0, atol=1e-9)

    bad_gt = _tiny_gt()
    bad_gt["annotations"][1]["segmentation"] = {"size": [6, 8], "counts": [1, 2]}
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(bad_gt))
    dt_path.write_text(json.dumps([_tiny_result()]))
    out = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), f"--annotations={gt_path}", f"--detections={dt_path}",
         f"--out={tmp_path / 'o2'}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
    assert f"annotations file '{gt_path}'" in lines[0] and "annotation id 42" in lines[0]
