"""TensorFlow Datasets (COCO, Pascal VOC) as random-access sources, without TensorFlow.

    source = TfdsSource("coco/2017", "validation", data_dir="~/tensorflow_datasets")
    example = source[0]          # the record of `example.py`

Reads a dataset prepared in ArrayRecord format through `tfds.data_source` (random access;
TensorFlow is not needed to read). Preparing it is a one-time step that does need
TensorFlow (the builders download and parse with it):

    pip install tensorflow
    tfds build coco/2017 --data_dir=DATA_DIR --file_format=array_record

Supported names: coco/2014, coco/2017 (the "objects" features: 80 contiguous labels 0..79,
normalised [ymin, xmin, ymax, xmax] boxes, `image/id`, `is_crowd`), voc/2007 and
voc/2012 (20 labels, `is_difficult`, no image id: the id is the file name's digits,
"000005.jpg" -> 5, "2008_000002.jpg" -> 2008000002).

Conversion to the record: boxes * (W, H) -> pixels (x1, y1, x2, y2); labels + 1; COCO
`label_to_category_id` maps to the official COCO category ids (1..90 with gaps,
`frcnn_jax.categories.COCO_CATEGORY_IDS`); VOC ids are 1..20. Boxes of zero width or
height are dropped. Grayscale images are expanded to RGB.

`coco_gt()` rebuilds COCO-format ground truth from the records (image sizes read from the
encoded image headers, no full decode), for COCO and VOC alike. COCO areas are the
dataset's own (mask) areas, so small/medium/large splits match the official ones; box
coordinates went through tfds' float32 normalisation, so they can differ from the
official JSON by ~1e-4 px: use `CocoJsonSource` with the official file for official
numbers. VOC "difficult" boxes are marked `iscrowd` 1 so COCO-style evaluation ignores
them, as the VOC protocol does.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from frcnn_jax.categories import COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES_91, VOC_CLASS_NAMES
from frcnn_jax.data.coco_gt import coco_gt_from_targets
from frcnn_jax.data.example import make_example

# name -> layout of the features ("coco" or "voc").
SUPPORTED = {"coco/2014": "coco", "coco/2017": "coco", "voc/2007": "voc", "voc/2012": "voc"}

_BUILD_HINT = (
    "Prepare it once in ArrayRecord format (this step needs TensorFlow installed; reading does not): "
    "`pip install tensorflow && tfds build {name} --data_dir={data_dir} --file_format=array_record`"
)


def default_data_dir() -> str:
    """$TFDS_DATA_DIR, else ~/tensorflow_datasets (tfds' own default)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def _version_key(version: str):
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (-1,)


def find_prepared_version(name: str, data_dir: str) -> str:
    """The newest version of `name` prepared under data_dir (a folder with dataset_info.json).

    Raises:
      FileNotFoundError with the one-time `tfds build` command when there is none;
      ValueError when the newest one was not written in ArrayRecord format.
    """
    root = os.path.join(data_dir, *name.split("/"))
    versions = []
    if os.path.isdir(root):
        versions = [
            v
            for v in os.listdir(root)
            if not v.startswith("incomplete") and os.path.isfile(os.path.join(root, v, "dataset_info.json"))
        ]
    if not versions:
        raise FileNotFoundError(
            f"tfds dataset {name} is not prepared in data_dir={data_dir} (no {root}/<version>/dataset_info.json). "
            + _BUILD_HINT.format(name=name, data_dir=data_dir)
        )
    version = max(versions, key=_version_key)
    with open(os.path.join(root, version, "dataset_info.json")) as f:
        info = json.load(f)
    formats = [info.get("fileFormat", "tfrecord")] + list(info.get("alternativeFileFormats", []))
    if "array_record" not in formats:
        raise ValueError(
            f"tfds dataset {name}:{version} in {data_dir} is stored as {formats[0]}, but random access needs "
            "ArrayRecord. " + _BUILD_HINT.format(name=name, data_dir=data_dir)
        )
    return version


def _image_id_from_filename(file_name: str, fallback: int) -> int:
    digits = "".join(ch for ch in os.path.splitext(os.path.basename(file_name))[0] if ch.isdigit())
    return int(digits) if digits else fallback


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """Random-access source over a prepared tfds COCO or VOC split.

    Args:
      name: one of SUPPORTED ("coco/2017", "voc/2007", ...).
      split: a tfds split ("train", "validation", "test", or a slice like "train[:1%]").
      data_dir: tfds data folder (default $TFDS_DATA_DIR or ~/tensorflow_datasets).
    """

    has_masks = False  # the tfds COCO and VOC features carry boxes only

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        if name not in SUPPORTED:
            raise ValueError(f"unknown tfds dataset name {name!r}; supported: {sorted(SUPPORTED)}")
        import tensorflow_datasets as tfds  # imported lazily: tfds is slow to import and only needed here

        self.name, self.split = name, split
        self.kind = SUPPORTED[name]
        self.data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir is not None else default_data_dir()
        self.version = find_prepared_version(name, self.data_dir)
        full_name = f"{name}:{self.version}"  # explicit version: tfds reads the prepared files, no builder code (no TF)
        try:
            self._ds = tfds.data_source(full_name, split=split, data_dir=self.data_dir)
        except ValueError as e:
            raise ValueError(f"tfds dataset {full_name} in {self.data_dir}: cannot open split {split!r}: {e}") from e
        self._raw = None  # a second reader that skips image decoding (for coco_gt), opened on demand
        label_names = list(self._ds.dataset_info.features["objects"]["label"].names)
        if self.kind == "coco":
            self.label_to_category_id = {i + 1: cid for i, cid in enumerate(COCO_CATEGORY_IDS)}
            official = [COCO_CATEGORY_NAMES_91[cid] for cid in COCO_CATEGORY_IDS]
        else:
            self.label_to_category_id = {i + 1: i + 1 for i in range(len(VOC_CLASS_NAMES))}
            official = list(VOC_CLASS_NAMES)
        if len(label_names) != len(official):
            raise ValueError(
                f"tfds dataset {full_name}: expected {len(official)} labels, the dataset has {len(label_names)}"
            )
        # Builders that did not record names store "0", "1", ...: use the official names then.
        self.category_names = official if all(n.isdigit() for n in label_names) else label_names
        self.num_object_classes = len(self.category_names)

    def __len__(self) -> int:
        return len(self._ds)

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, {self.split!r}, data_dir={self.data_dir!r}, images={len(self)})"

    def _image_id(self, raw: dict, index: int) -> int:
        if self.kind == "coco":
            return int(raw["image/id"])
        return _image_id_from_filename(_as_text(raw["image/filename"]), index)

    def _targets(self, raw: dict, height: int, width: int):
        objects = raw["objects"]
        norm = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)  # [ymin, xmin, ymax, xmax] in 0..1
        boxes = norm[:, [1, 0, 3, 2]] * np.array([width, height, width, height], np.float32)
        labels = np.asarray(objects["label"], np.int64).reshape(-1).astype(np.int32) + 1
        n = boxes.shape[0]
        if self.kind == "coco":
            crowd = np.asarray(objects["is_crowd"], bool).reshape(n)
            difficult = np.zeros(n, bool)
            area = np.asarray(objects["area"], np.float64).reshape(n)
        else:
            crowd = np.zeros(n, bool)
            difficult = np.asarray(objects["is_difficult"], bool).reshape(n)
            area = None
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], labels[keep], crowd[keep], difficult[keep], (None if area is None else area[keep])

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        raw = self._ds[index]
        image = np.asarray(raw["image"])
        if image.ndim == 2:
            image = image[..., None]
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif image.shape[2] == 4:
            image = image[..., :3]
        boxes, labels, crowd, difficult, _ = self._targets(raw, image.shape[0], image.shape[1])
        return make_example(image, boxes, labels, self._image_id(raw, index), crowd, difficult)

    def coco_gt(self) -> dict:
        """COCO-format ground truth of the split (reads every record once, images undecoded)."""
        import tensorflow_datasets as tfds

        if self._raw is None:
            self._raw = tfds.data_source(
                f"{self.name}:{self.version}",
                split=self.split,
                data_dir=self.data_dir,
                decoders={"image": tfds.decode.SkipDecoding()},
            )

        def entries():
            for i in range(len(self._raw)):
                raw = self._raw[i]
                with Image.open(io.BytesIO(raw["image"])) as im:  # header only
                    width, height = im.size
                boxes, labels, crowd, difficult, area = self._targets(raw, height, width)
                yield {
                    "image_id": self._image_id(raw, i),
                    "height": height,
                    "width": width,
                    "file_name": _as_text(raw["image/filename"]),
                    "boxes": boxes,
                    "labels": labels,
                    "is_crowd": crowd | difficult,
                    "area": area,
                }

        return coco_gt_from_targets(entries(), self.category_names, self.label_to_category_id)
