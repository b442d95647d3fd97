"""frcnn_jax.evaluation (COCO via pycocotools, Pascal VOC AP, plots, reports) and eval.py."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from frcnn_jax import evaluation
from frcnn_jax.evaluation import STAT_KEYS, EvaluationInputError, evaluate_coco, evaluate_voc, to_coco_results, voc_ap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# COCO: the official fixture.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_fixture(shared):
    d = shared / "data" / "coco_eval_fixture"
    expected = json.loads((d / "expected_stats_pycocotools.json").read_text())["bbox"]
    return d / "instances_val2014_100.json", d / "instances_val2014_fakebbox100_results.json", expected


@pytest.fixture(scope="module")
def fixture_result(coco_fixture):
    gt, dt, _ = coco_fixture
    return evaluate_coco(gt, dt)


def test_official_fixture_reproduces_pycocotools_stats(coco_fixture, fixture_result):
    _, _, expected = coco_fixture
    assert len(expected) == len(STAT_KEYS) == 12
    for key, want in zip(STAT_KEYS, expected):
        assert fixture_result.stats[key] == pytest.approx(want, abs=1e-12), key
        assert type(fixture_result.stats[key]) is float
    assert fixture_result.stats["AP"] == pytest.approx(0.5045806987249628, abs=1e-12)
    assert fixture_result.num_images == 100 and len(fixture_result.detections) == 734
    lines = fixture_result.summary.splitlines()
    assert len(lines) == 12
    assert lines[0] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.505"


def test_fixture_same_numbers_from_dict_list_and_coco_object(coco_fixture, fixture_result):
    from pycocotools.coco import COCO

    gt_path, dt_path, _ = coco_fixture
    gt = json.loads(gt_path.read_text())
    dt = json.loads(dt_path.read_text())
    dt_before = copy.deepcopy(dt)
    by_dict = evaluate_coco(gt, dt)
    assert dt == dt_before, "the detections list must not be modified"
    assert by_dict.stats == fixture_result.stats
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert evaluate_coco(coco, str(dt_path)).stats == fixture_result.stats


def test_fixture_per_class_ap(fixture_result):
    per_class = fixture_result.per_class
    assert len(per_class) == 80 and list(per_class)[:3] == ["person", "bicycle", "car"]
    present = [v for v in per_class.values() if v is not None]
    assert len(present) == 70  # 10 categories have no (non-crowd) GT in these 100 images
    assert per_class["fire hydrant"] is None
    # Classes without GT are -1 everywhere and excluded from both means, so the mean of the
    # per-class APs is the overall AP.
    assert np.mean(present) == pytest.approx(fixture_result.stats["AP"], abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in present)
    t, r, k, a, m = fixture_result.precision.shape
    assert (t, r, k, a, m) == (10, 101, 80, 4, 3)


def test_fixture_plot_and_curves(fixture_result, tmp_path):
    curves = evaluation.mean_precision_curves(fixture_result)
    assert list(curves) == ["IoU=0.50", "IoU=0.75", "IoU=0.50:0.95"]
    # The mean of each class-averaged curve over the 101 recall points is its AP stat.
    for (_, prec, ap), key in zip(curves.values(), ("AP50", "AP75", "AP")):
        assert prec.shape == (101,) and np.mean(prec) == pytest.approx(fixture_result.stats[key], abs=1e-9)
        assert ap == fixture_result.stats[key]
    path = tmp_path / "pr.png"
    evaluation.plot_precision_recall(fixture_result, path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------------------
# COCO: synthetic ground truth.
# --------------------------------------------------------------------------------------


def _synthetic_gt(num_images=4, categories=(1, 3, 7)):
    """Small COCO GT: per image one small, one medium and one large box per category."""
    images = [{"id": 10 + i, "width": 640, "height": 480} for i in range(num_images)]
    cats = [{"id": c, "name": f"cat{c}"} for c in categories]
    anns = []
    for img in images:
        for j, c in enumerate(categories):
            for x, y, s in ((5 + 40 * j, 5, 20), (5 + 120 * j, 100, 60), (5 + 200 * j, 200, 150)):
                anns.append(
                    {"id": len(anns) + 1, "image_id": img["id"], "category_id": c, "bbox": [x, y, s, s],
                     "area": float(s * s), "iscrowd": 0}
                )  # fmt: skip
    return {"images": images, "annotations": anns, "categories": cats}


def _as_detections(annotations, score):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
        for a in annotations
    ]


def test_gt_as_detections_gives_ap_one():
    gt = _synthetic_gt()
    res = evaluate_coco(gt, _as_detections(gt["annotations"], 0.9))
    # AR1 keeps 1 detection per image and category, and there are 3 GT boxes each: 1/3.
    assert res.stats == {**{k: 1.0 for k in STAT_KEYS}, "AR1": pytest.approx(1 / 3, abs=1e-15)}
    assert res.per_class == {"cat1": 1.0, "cat3": 1.0, "cat7": 1.0}


def test_empty_detections_give_zeros():
    gt = _synthetic_gt()
    res = evaluate_coco(gt, [])
    assert res.stats == {k: 0.0 for k in STAT_KEYS}
    assert res.per_class == {"cat1": 0.0, "cat3": 0.0, "cat7": 0.0}
    assert res.detections == [] and len(res.summary.strip().splitlines()) == 12
    # pycocotools reports -1 (not 0) for an area range without GT; so does an empty run.
    no_small = _synthetic_gt()
    no_small["annotations"] = [a for a in no_small["annotations"] if a["area"] > 32**2]
    stats = evaluate_coco(no_small, []).stats
    assert stats["APs"] == -1.0 and stats["ARs"] == -1.0 and stats["AP"] == 0.0


def test_per_class_mean_equals_ap_when_every_class_has_gt():
    gt = _synthetic_gt(num_images=6)
    rng = np.random.default_rng(0)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        if rng.uniform() < 0.8:  # jittered hits
            j = rng.normal(0, 0.05 * w, 4)
            box = [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)]
            dets += _as_detections([{**a, "bbox": box}], float(rng.uniform()))
        if rng.uniform() < 0.5:  # false positives elsewhere
            box = [float(rng.uniform(300, 500)), 400.0, 30.0, 30.0]
            dets += _as_detections([{**a, "bbox": box}], float(rng.uniform()))
    res = evaluate_coco(gt, dets)
    assert all(v is not None for v in res.per_class.values())
    assert 0.1 < res.stats["AP"] < 0.95
    assert np.mean(list(res.per_class.values())) == pytest.approx(res.stats["AP"], abs=1e-9)


def test_to_coco_results_converts_boxes_maps_categories_and_drops_padding():
    boxes = np.array(
        [[[10.0, 20.0, 110.0, 70.0], [0.5, 1.5, 2.5, 4.0], [0, 0, 0, 0]],
         [[1.0, 2.0, 3.0, 5.0], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32
    )  # fmt: skip
    scores = np.array([[0.9, 0.25, 0.0], [0.5, 0.0, 0.0]], np.float32)
    labels = np.array([[2, 1, 0], [1, 0, 0]], np.int32)
    valid = np.array([[True, True, False], [True, False, False]])
    out = to_coco_results(np.array([42, 73]), boxes, scores, labels, {1: 1, 2: 18}, valid=valid)
    assert out == [
        {"image_id": 42, "category_id": 18, "bbox": [10.0, 20.0, 100.0, 50.0], "score": pytest.approx(0.9)},
        {"image_id": 42, "category_id": 1, "bbox": [0.5, 1.5, 2.0, 2.5], "score": 0.25},
        {"image_id": 73, "category_id": 1, "bbox": [1.0, 2.0, 2.0, 3.0], "score": 0.5},
    ]
    for r in out:
        assert type(r["image_id"]) is int and type(r["category_id"]) is int and type(r["score"]) is float
        assert all(type(v) is float for v in r["bbox"])
    json.dumps(out)
    # Without `valid`, label 0 marks padding; a sequence indexed by label works as the map.
    assert to_coco_results([42, 73], boxes, scores, labels, [0, 1, 18]) == out
    # Ragged per-image lists; None = labels already are category ids.
    ragged = to_coco_results([5], [boxes[0][:2]], [scores[0][:2]], [labels[0][:2]], None)
    assert [r["category_id"] for r in ragged] == [2, 1]
    cmap = evaluation.contiguous_label_map([1, 18])
    assert cmap == {1: 1, 2: 18}
    with pytest.raises(ValueError, match="label 2 has no category id"):
        to_coco_results([42], boxes[:1], scores[:1], labels[:1], {1: 1})
    with pytest.raises(ValueError, match="same batch size"):
        to_coco_results([42, 73, 74], boxes, scores, labels, cmap)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda gt, dt: dt.append({"image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}),
         r"detections: 1 results refer to image ids not in ground truth \(e.g. \[999\]\)"),
        (lambda gt, dt: dt.append({"image_id": 10, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.5}),
         r"category ids not in ground truth \(e.g. \[2\]\)"),
        (lambda gt, dt: dt[0].update(bbox=[0, 0, 1]), r"item 0 'bbox' must be 4 finite numbers"),
        (lambda gt, dt: dt[0].update(bbox=[5, 5, -1, 3]), r"negative width or height"),
        (lambda gt, dt: dt[0].pop("score"), r"item 0 has no finite numeric 'score'"),
        (lambda gt, dt: gt["annotations"][1].pop("area"), r"annotation id 2 \(annotations\[1\]\) has no numeric 'area'"),
        (lambda gt, dt: gt.pop("categories"), r"not a COCO ground-truth file: missing required key 'categories'"),
        (lambda gt, dt: gt["annotations"][2].update(id=1), r"duplicate annotation id 1 \(annotations\[2\]\)"),
    ],
)  # fmt: skip
def test_bad_coco_inputs_raise_clear_errors(mutate, match):
    gt = _synthetic_gt()
    dt = _as_detections(gt["annotations"], 0.5)
    mutate(gt, dt)
    with pytest.raises(EvaluationInputError, match=match):
        evaluate_coco(gt, dt)


def test_top_level_swapped_files_are_named(tmp_path):
    gt = _synthetic_gt()
    gt_path, dt_path = tmp_path / "gt.json", tmp_path / "dt.json"
    gt_path.write_text(json.dumps(gt))
    dt_path.write_text("[]")
    not_gt = r"annotations file '.*dt.json' is not a COCO ground-truth file: top level is a list"
    with pytest.raises(EvaluationInputError, match=not_gt):
        evaluate_coco(dt_path, gt_path)
    not_results = r"detections file '.*gt.json' is not a COCO results list: top level is an object"
    with pytest.raises(EvaluationInputError, match=not_results):
        evaluate_coco(gt_path, gt_path)
    assert evaluate_coco(gt_path, dt_path).stats["AP"] == 0.0


def test_metrics_json_keys_and_full_precision(tmp_path):
    gt = _synthetic_gt()
    gt["categories"].append({"id": 9, "name": "no_gt"})
    dets = _as_detections(gt["annotations"][::2], 0.9)
    res = evaluate_coco(gt, dets)
    paths = evaluation.write_coco_report(tmp_path / "out", res)
    metrics = json.loads(paths["metrics"].read_text())
    assert list(metrics) == [*STAT_KEYS, "per_class"]
    assert {k: metrics[k] for k in STAT_KEYS} == res.stats  # floats round-trip exactly
    assert metrics["per_class"]["no_gt"] is None and metrics["per_class"] == res.per_class
    assert json.loads(paths["detections"].read_text()) == dets
    assert paths["plot"].read_bytes()[:8] == PNG_SIGNATURE
    table = evaluation.format_per_class_table(res.per_class)
    assert "no_gt" in table and "cat7" in table


# --------------------------------------------------------------------------------------
# Pascal VOC.
# --------------------------------------------------------------------------------------


def test_voc_ap_hand_worked():
    # 2 GT boxes; detections in score order: TP, FP, TP.
    # recall    = [1/2, 1/2, 1]
    # precision = [1,   1/2, 2/3]
    # area: envelope [1, 2/3, 2/3] -> 1/2 * 1 + (1 - 1/2) * 2/3 = 1/2 + 1/3 = 5/6
    # 11-point: t = 0.0..0.5 (6 levels): max precision at recall >= t = 1;
    #           t = 0.6..1.0 (5 levels): only recall 1 -> 2/3;  (6 + 5 * 2/3) / 11 = 28/33
    rec, prec = [0.5, 0.5, 1.0], [1.0, 0.5, 2 / 3]
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 6, abs=1e-15)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(28 / 33, abs=1e-15)
    # Recall exactly 0.3 reaches the 0.3 level (exact k/10 levels): 4 levels of precision 1.
    assert voc_ap([0.1, 0.3], [1.0, 1.0], use_07_metric=True) == pytest.approx(4 / 11, abs=1e-15)
    assert voc_ap([], [], use_07_metric=True) == 0.0 and voc_ap([], [], use_07_metric=False) == 0.0


def _img(boxes, labels, difficult=None):
    d = {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "labels": np.array(labels, np.int64)}
    if difficult is not None:
        d["difficult"] = np.array(difficult, bool)
    return d


def _det(boxes, scores, labels):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "labels": np.array(labels, np.int64)}  # fmt: skip


def test_evaluate_voc_hand_worked_two_images():
    # Class 1 ("a"): image 0 has g1 = [0,0,10,10], g2 = [20,20,30,30]; image 1 has g3 = [0,0,10,10].
    # Detections by score: d1 0.9 on g1 (TP), d2 0.8 in image 1 far away (FP),
    # d3 0.7 duplicate of g1 (FP: g1 already matched), d4 0.6 on g3 (TP).
    # recall [1/3, 1/3, 1/3, 2/3], precision [1, 1/2, 1/3, 1/2]
    # area: 1/3 * 1 + 1/3 * 1/2 = 1/2
    # 11-point: t = 0..0.3 -> 1 (4 levels), t = 0.4..0.6 -> 1/2 (3 levels), t >= 0.7 -> 0: 5.5 / 11 = 1/2
    # Class 2 ("b"): one GT, no detection -> AP 0. Class 3 ("c"): no GT -> None, not in the mAP.
    gts = [_img([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [1, 1, 2]), _img([[0, 0, 10, 10]], [1])]
    dets = [
        _det([[0, 0, 10, 10], [1, 0, 10, 10], [0, 0, 5, 5]], [0.9, 0.7, 0.3], [1, 1, 3]),
        _det([[100, 100, 120, 120], [0, 1, 10, 11]], [0.8, 0.6], [1, 1]),
    ]
    out = evaluate_voc(gts, dets, 3, ["a", "b", "c"])
    assert out["AP_area"] == {"a": pytest.approx(0.5, abs=1e-15), "b": 0.0, "c": None}
    assert out["AP_07_11point"] == {"a": pytest.approx(0.5, abs=1e-15), "b": 0.0, "c": None}
    assert out["mAP_area"] == pytest.approx(0.25, abs=1e-15)
    assert out["mAP_07_11point"] == pytest.approx(0.25, abs=1e-15)
    assert out["num_positives"] == {"a": 3, "b": 1, "c": 0}


def test_evaluate_voc_difficult_boxes_are_ignored():
    # g1 normal, g2 difficult. d1 (0.9) hits g2 -> ignored (neither TP nor FP); d1b (0.85), a
    # duplicate on g2 -> ignored too; d2 (0.8) hits g1 -> TP. Only one positive: AP 1.
    # (Were g2 a negative, d1 and d1b would be FPs: precision 1/3 at the TP -> area AP 1/3.)
    gts = [_img([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [False, True])]
    dets = [_det([[20, 20, 30, 30], [20, 21, 30, 30], [0, 0, 10, 10]], [0.9, 0.85, 0.8], [1, 1, 1])]
    out = evaluate_voc(gts, dets, 1)
    assert out["num_positives"] == {"class_1": 1}
    assert out["AP_area"]["class_1"] == 1.0 and out["AP_07_11point"]["class_1"] == 1.0
    # Undetected difficult box: recall is still 1/1 (it was never a positive).
    out = evaluate_voc(gts, [_det([[0, 0, 10, 10]], [0.5], [1])], 1)
    assert out["mAP_area"] == 1.0
    # Without the difficult flag it is a positive: recall 1/2 -> area AP 1/2, 11-point 6/11.
    plain = [_img([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1])]
    out = evaluate_voc(plain, [_det([[0, 0, 10, 10]], [0.5], [1])], 1)
    assert out["mAP_area"] == pytest.approx(0.5) and out["mAP_07_11point"] == pytest.approx(6 / 11)


def test_evaluate_voc_iou_convention_no_plus_one():
    gts = [_img([[0, 0, 10, 10]], [1])]
    # IoU exactly 0.5 (50 / 100) is a match (>= 0.5).
    assert evaluate_voc(gts, [_det([[0, 0, 10, 5]], [0.9], [1])], 1)["mAP_area"] == 1.0
    # IoU 0.49 without "+1" -> miss. (With the devkit's +1 pixel convention it would be
    # 11 * 5.9 / 121 = 0.536, a match.)
    assert evaluate_voc(gts, [_det([[0, 0, 10, 4.9]], [0.9], [1])], 1)["mAP_area"] == 0.0


def test_evaluate_voc_validates_inputs():
    gts = [_img([[0, 0, 10, 10]], [1])]
    with pytest.raises(ValueError, match="num_object_classes counts foreground classes only"):
        evaluate_voc(gts, [_det([], [], [])], 21, [f"c{i}" for i in range(20)])
    with pytest.raises(ValueError, match="labels outside 1..1"):
        evaluate_voc(gts, [_det([[0, 0, 1, 1]], [0.5], [2])], 1)
    with pytest.raises(ValueError, match="1 GT images but 2 detection images"):
        evaluate_voc(gts, [_det([], [], []), _det([], [], [])], 1)
    # label 0 / valid=False entries are padding and dropped.
    d = _det([[0, 0, 10, 10], [50, 50, 60, 60], [70, 70, 80, 80]], [0.9, 0.95, 0.99], [1, 0, 1])
    d["valid"] = np.array([True, True, False])
    assert evaluate_voc(gts, [d], 1)["mAP_area"] == 1.0


def _brute_force_voc(gts, dets, num_classes):
    """Independent, loop-by-loop VOC evaluation (same conventions) for the random test."""

    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    ap07, ap_area = {}, {}
    for c in range(1, num_classes + 1):
        npos = sum(1 for g in gts for lab, dif in zip(g["labels"], g["difficult"]) if lab == c and not dif)
        cand = []
        for i, d in enumerate(dets):
            for k in range(len(d["scores"])):
                if d["labels"][k] == c and d["valid"][k]:
                    cand.append((-float(d["scores"][k]), i, k))
        cand.sort()
        used = set()
        flags = []  # "tp" / "fp" / "ignore"
        for _, i, k in cand:
            box = [float(v) for v in dets[i]["boxes"][k]]
            best, best_j = -1.0, None
            for j, (gb, lab) in enumerate(zip(gts[i]["boxes"], gts[i]["labels"])):
                if lab != c:
                    continue
                o = iou(box, [float(v) for v in gb])
                if o > best:
                    best, best_j = o, j
            if best_j is None or best < 0.5:
                flags.append("fp")
            elif gts[i]["difficult"][best_j]:
                flags.append("ignore")
            elif (i, best_j) in used:
                flags.append("fp")
            else:
                used.add((i, best_j))
                flags.append("tp")
        if npos == 0:
            ap07[c] = ap_area[c] = None
            continue
        tp = fp = 0
        rec, prec = [], []
        for f in flags:
            tp += f == "tp"
            fp += f == "fp"
            rec.append(tp / npos)
            prec.append(tp / (tp + fp) if tp + fp else 0.0)
        ap07[c] = sum(max([p for r, p in zip(rec, prec) if r >= t / 10], default=0.0) for t in range(11)) / 11
        area, prev = 0.0, 0.0
        for r in sorted(set(rec)):
            if r > prev:
                area += (r - prev) * max(p for rr, p in zip(rec, prec) if rr >= r)
                prev = r
        ap_area[c] = area
    return ap07, ap_area


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_evaluate_voc_matches_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    num_classes, num_images = 4, 12
    gts, dets = [], []
    for _ in range(num_images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(5, 40, (n, 2))
        gt = {"boxes": np.concatenate([xy, xy + wh], 1), "labels": rng.integers(1, num_classes + 1, n),
              "difficult": rng.uniform(size=n) < 0.2}  # fmt: skip
        # Detections: jittered copies of GT boxes (some duplicated, some wrong class) and clutter.
        src = rng.integers(0, max(n, 1), int(rng.integers(0, 9))) if n else np.zeros(0, int)
        jitter = rng.normal(0, 4, (len(src), 4))
        hits = gt["boxes"][src] + jitter if n else np.zeros((0, 4))
        wrong = rng.integers(1, num_classes + 1, len(src))
        hit_labels = np.where(rng.uniform(size=len(src)) < 0.85, gt["labels"][src] if n else 0, wrong)
        m = int(rng.integers(0, 4))
        cxy = rng.uniform(0, 80, (m, 2))
        clutter = np.concatenate([cxy, cxy + rng.uniform(5, 40, (m, 2))], 1)
        boxes = np.concatenate([hits, clutter]).astype(np.float32)
        labels = np.concatenate([hit_labels, rng.integers(0, num_classes + 1, m)]).astype(np.int64)  # 0 = padding
        scores = np.round(rng.uniform(size=len(boxes)), 1).astype(np.float32)  # ties on purpose
        valid = (rng.uniform(size=len(boxes)) < 0.9) & (labels > 0)
        gts.append(gt)
        dets.append({"boxes": boxes, "scores": scores, "labels": labels, "valid": valid})
    out = evaluate_voc(gts, dets, num_classes)
    ref07, ref_area = _brute_force_voc(gts, dets, num_classes)
    for c in range(1, num_classes + 1):
        name = f"class_{c}"
        if ref07[c] is None:
            assert out["AP_07_11point"][name] is None and out["AP_area"][name] is None
        else:
            assert out["AP_07_11point"][name] == pytest.approx(ref07[c], abs=1e-12)
            assert out["AP_area"][name] == pytest.approx(ref_area[c], abs=1e-12)
    present = [v for v in ref_area.values() if v is not None]
    assert out["mAP_area"] == pytest.approx(np.mean(present), abs=1e-12)
    assert 0.0 < out["mAP_area"] < 1.0


# --------------------------------------------------------------------------------------
# eval.py end to end.
# --------------------------------------------------------------------------------------


def _run_eval(*args):
    cmd = [sys.executable, "eval.py", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_eval_py_on_fixture(coco_fixture, tmp_path):
    gt, dt, expected = coco_fixture
    out = tmp_path / "eval_out"
    proc = _run_eval("--annotations", gt, "--detections", dt, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.505" in proc.stdout
    assert " Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = 0.564" in proc.stdout
    assert "teddy bear" in proc.stdout  # the per-class table
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == [*STAT_KEYS, "per_class"]
    for key, want in zip(STAT_KEYS, expected):
        assert metrics[key] == pytest.approx(want, abs=1e-12), key
    assert len(metrics["per_class"]) == 80 and metrics["per_class"]["fire hydrant"] is None
    assert json.loads((out / "detections.json").read_text()) == json.loads(dt.read_text())
    png = (out / "precision_recall.png").read_bytes()
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    from PIL import Image

    with Image.open(out / "precision_recall.png") as im:
        im.verify()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def _assert_one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_eval_py_bad_inputs(coco_fixture, tmp_path):
    gt, dt, _ = coco_fixture
    missing = tmp_path / "missing.json"
    proc = _run_eval("--annotations", gt, "--detections", missing, "--out", tmp_path / "o1")
    _assert_one_line_error(proc, str(missing), "does not exist")

    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [1, 2,')
    proc = _run_eval("--annotations", bad, "--detections", dt, "--out", tmp_path / "o2")
    _assert_one_line_error(proc, str(bad), "not valid JSON")

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps([{"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]))
    proc = _run_eval("--annotations", gt, "--detections", foreign, "--out", tmp_path / "o3")
    _assert_one_line_error(proc, str(foreign), "image ids not in", str(gt))
    assert not (tmp_path / "o3" / "metrics.json").exists()


def test_eval_py_usage():
    proc = _run_eval("--help")
    for flag in ("--annotations", "--detections", "--out", "--checkpoint", "--config", "--split", "--max_images"):
        assert flag in proc.stdout
    proc = _run_eval()
    assert proc.returncode == 2 and "missing --out" in proc.stderr
    proc = _run_eval("--out", "x")
    assert proc.returncode == 2 and "missing --annotations, --detections, or --checkpoint" in proc.stderr
