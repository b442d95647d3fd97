"""TfdsSource on tiny COCO / VOC datasets built locally (ArrayRecord, real coco128 photos, no TensorFlow).

The builders below mirror the features of tfds' `coco/2017` (config 2017, version 1.1.0)
and `voc/2007` (version 5.0.0) and write under the same names into a temporary data_dir,
so `TfdsSource("coco/2017", ...)` reads them exactly like the real prepared datasets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds  # a runtime dependency: a missing one is an error, not a skip

from frcnn_jax.categories import COCO_CATEGORY_IDS, VOC_CLASS_NAMES
from frcnn_jax.data import TfdsSource, validate_example
from frcnn_jax.data.images import decode_image

# Images 9 and 25 (several boxes), 149 (with a crowd box), 308 (annotations removed: an image without objects).
COCO_IMAGE_IDS = (9, 149, 25, 308)


def _coco_builder(images_dir, coco):
    images = [im for im in coco["images"] if im["id"] in COCO_IMAGE_IDS]
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    by_image[308] = []  # an image without annotations

    class Coco(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "coco"
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2017", version=tfds.core.Version("1.1.0"))]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "image/filename": tfds.features.Text(),
                        "image/id": np.int64,
                        "objects": tfds.features.Sequence(
                            {
                                "id": np.int64,
                                "area": np.int64,
                                "bbox": tfds.features.BBoxFeature(),
                                "label": tfds.features.ClassLabel(names=names),
                                "is_crowd": np.bool_,
                            }
                        ),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):  # as tfds' coco.py: sorted by id, normalised boxes
            for im in sorted(images, key=lambda x: x["id"]):
                w, h = im["width"], im["height"]
                yield (
                    im["file_name"],
                    {
                        "image": str(images_dir / im["file_name"]),
                        "image/filename": im["file_name"],
                        "image/id": im["id"],
                        "objects": [
                            {
                                "id": a["id"],
                                "area": a["area"],
                                "bbox": tfds.features.BBox(
                                    ymin=a["bbox"][1] / h,
                                    xmin=a["bbox"][0] / w,
                                    ymax=(a["bbox"][1] + a["bbox"][3]) / h,
                                    xmax=(a["bbox"][0] + a["bbox"][2]) / w,
                                ),
                                "label": names[COCO_CATEGORY_IDS.index(a["category_id"])],
                                "is_crowd": bool(a["iscrowd"]),
                            }
                            for a in by_image.get(im["id"], [])
                        ],
                    },
                )

    return Coco, images, by_image


VOC_OBJECTS = {  # file -> [(label, (xmin, ymin, xmax, ymax) pixels, difficult)]
    "000000000009.jpg": [("diningtable", (1, 187, 612, 473), False), ("person", (10, 20, 40, 60), True)],
    "000000000025.jpg": [("cow", (385, 60, 600, 357), False)],
}


def _voc_builder(images_dir):
    poses = ("frontal", "rear", "left", "right", "unspecified")

    class Voc(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = "voc"
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2007", version=tfds.core.Version("5.0.0"))]

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(),
                        "image/filename": tfds.features.Text(),
                        "objects": tfds.features.Sequence(
                            {
                                "label": tfds.features.ClassLabel(names=VOC_CLASS_NAMES),
                                "bbox": tfds.features.BBoxFeature(),
                                "pose": tfds.features.ClassLabel(names=poses),
                                "is_truncated": np.bool_,
                                "is_difficult": np.bool_,
                            }
                        ),
                        "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=VOC_CLASS_NAMES)),
                        "labels_no_difficult": tfds.features.Sequence(tfds.features.ClassLabel(names=VOC_CLASS_NAMES)),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"test": self._generate_examples()}

        def _generate_examples(self):
            sizes = {"000000000009.jpg": (480, 640), "000000000025.jpg": (426, 640)}
            for name, objects in VOC_OBJECTS.items():
                h, w = sizes[name]
                yield (
                    name,
                    {
                        "image": str(images_dir / name),
                        "image/filename": name,
                        "objects": [
                            {
                                "label": label,
                                "pose": "unspecified",
                                "is_truncated": False,
                                "is_difficult": diff,
                                "bbox": tfds.features.BBox(b[1] / h, b[0] / w, b[3] / h, b[2] / w),
                            }
                            for label, b, diff in objects
                        ],
                        "labels": sorted({o[0] for o in objects}),
                        "labels_no_difficult": sorted({o[0] for o in objects if not o[2]}),
                    },
                )

    return Voc


@pytest.fixture(scope="module")
def tiny_tfds(shared, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    images_dir = shared / "data/coco128/images"
    coco = json.loads((shared / "data/coco128/annotations.json").read_text())
    coco_cls, images, by_image = _coco_builder(images_dir, coco)
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    coco_cls(config="2017", data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=config
    )
    _voc_builder(images_dir)(config="2007", data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=config
    )
    return data_dir, images_dir, sorted(images, key=lambda x: x["id"]), by_image


def test_coco_records(tiny_tfds):
    data_dir, images_dir, images, by_image = tiny_tfds
    source = TfdsSource("coco/2017", "validation", data_dir=str(data_dir))
    assert len(source) == len(COCO_IMAGE_IDS) and source.num_object_classes == 80
    assert source.label_to_category_id == {i + 1: c for i, c in enumerate(COCO_CATEGORY_IDS)}
    assert source.category_names[0] == "person"
    records = {ex["image_id"]: ex for ex in (source[i] for i in range(len(source)))}  # tfds shuffles by key
    assert sorted(records) == sorted(COCO_IMAGE_IDS)
    n_crowd = 0
    for im in images:
        ex = records[im["id"]]
        validate_example(ex, 80)
        np.testing.assert_array_equal(ex["image"], decode_image(str(images_dir / im["file_name"])))
        anns = by_image[im["id"]]
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        expected = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        np.testing.assert_allclose(ex["boxes"], expected, rtol=0, atol=1e-3)  # float32 normalised round trip
        ids = [source.label_to_category_id[int(label)] for label in ex["labels"]]
        assert ids == [a["category_id"] for a in anns]
        np.testing.assert_array_equal(ex["is_crowd"], [bool(a["iscrowd"]) for a in anns])
        n_crowd += int(ex["is_crowd"].sum())
    assert n_crowd >= 1
    assert len(records[308]["boxes"]) == 0


def test_coco_gt_from_tfds(tiny_tfds):
    data_dir, _, images, by_image = tiny_tfds
    gt = TfdsSource("coco/2017", "validation", data_dir=str(data_dir)).coco_gt()
    assert sorted((g["id"], g["width"], g["height"], g["file_name"]) for g in gt["images"]) == [
        (im["id"], im["width"], im["height"], im["file_name"]) for im in images
    ]
    assert [c["id"] for c in gt["categories"]] == list(COCO_CATEGORY_IDS)
    anns = [a for g in gt["images"] for a in by_image[g["id"]]]  # in the records' order
    assert len(gt["annotations"]) == len(anns)
    for got, want in zip(gt["annotations"], anns):
        assert got["image_id"] == want["image_id"] and got["category_id"] == want["category_id"]
        assert got["iscrowd"] == want["iscrowd"] and got["area"] == int(want["area"])
        np.testing.assert_allclose(got["bbox"], want["bbox"], rtol=0, atol=1e-3)


def test_voc_records_and_gt(tiny_tfds):
    data_dir, _, _, _ = tiny_tfds
    source = TfdsSource("voc/2007", "test", data_dir=str(data_dir))
    assert len(source) == 2 and source.num_object_classes == 20
    assert source.category_names == list(VOC_CLASS_NAMES) and source.label_to_category_id[20] == 20
    by_id = {source[i]["image_id"]: source[i] for i in range(2)}
    assert set(by_id) == {9, 25}  # ids from the file names
    ex = by_id[9]
    validate_example(ex, 20)
    np.testing.assert_allclose(ex["boxes"], [[1, 187, 612, 473], [10, 20, 40, 60]], rtol=0, atol=1e-3)
    assert ex["labels"].tolist() == [VOC_CLASS_NAMES.index("diningtable") + 1, VOC_CLASS_NAMES.index("person") + 1]
    assert ex["difficult"].tolist() == [False, True] and not ex["is_crowd"].any()
    gt = source.coco_gt()
    assert len(gt["images"]) == 2 and len(gt["annotations"]) == 3
    assert [a["iscrowd"] for a in gt["annotations"] if a["image_id"] == 9] == [0, 1]  # difficult -> ignored


def test_errors(tmp_path, tiny_tfds):
    data_dir = tiny_tfds[0]
    with pytest.raises(ValueError, match="unknown tfds dataset name 'mnist'.*coco/2017"):
        TfdsSource("mnist", "train", data_dir=str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"not prepared.*TensorFlow.*tfds build voc/2012 .*--file_format=array_record"
    ):
        TfdsSource("voc/2012", "train", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="cannot open split 'train'"):
        TfdsSource("coco/2017", "train", data_dir=str(data_dir))
    # A dataset stored as TFRecord cannot be read with random access.
    info_dir = tmp_path / "coco/2014/1.1.0"
    info_dir.mkdir(parents=True)
    (info_dir / "dataset_info.json").write_text(json.dumps({"name": "coco", "fileFormat": "tfrecord"}))
    with pytest.raises(ValueError, match="stored as tfrecord.*--file_format=array_record"):
        TfdsSource("coco/2014", "validation", data_dir=str(tmp_path))


def test_source_pickles_for_workers(tiny_tfds):
    import cloudpickle

    source = TfdsSource("coco/2017", "validation", data_dir=str(tiny_tfds[0]))
    clone = cloudpickle.loads(cloudpickle.dumps(source))
    np.testing.assert_array_equal(clone[1]["boxes"], source[1]["boxes"])


def test_voc_model_evaluation_reports_both_voc_metrics(tiny_tfds):
    """eval.py's model path on a VOC dataset: COCO-style AP plus VOC mAP (11-point and area)."""
    import sys

    import jax

    from conftest import REPO
    from frcnn_jax.data import builder
    from frcnn_jax.evaluation.model_eval import evaluate_model
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables

    sys.path.insert(0, str(REPO))
    from configs import r50_c4_voc

    config = r50_c4_voc.get_config()
    config.data.tfds.data_dir = str(tiny_tfds[0])
    config.data.eval_batch_size = 2
    source = builder.build_source(config.data, "val")
    small = {
        "backbone.depth": 18, "backbone.width": 8, "rpn.test.pre_nms_top_n": 200, "rpn.test.post_nms_top_n": 50,
        "roi_heads.pooler.resolution": 6, "roi_heads.postprocess.score_thresh": 0.0,
    }  # fmt: skip
    model = FasterRCNN(ModelConfig.from_dict({**config.model.to_dict(), **small}))
    variables = init_variables(model, jax.random.key(0))
    coco, voc = evaluate_model(model, variables, source, config, voc=True, progress=False)
    assert set(coco.stats) >= {"AP", "AP50"}
    assert set(voc) >= {"mAP_07_11point", "mAP_area", "AP_07_11point", "AP_area"}
    assert 0.0 <= voc["mAP_area"] <= 1.0 and voc["AP_area"]["diningtable"] is not None
    assert voc["AP_area"]["aeroplane"] is None  # no ground truth for this class
