"""A data source for any COCO-format annotation file plus its image folder.

    source = CocoJsonSource("annotations/instances_val2017.json", "val2017")
    example = source[0]          # the record of `example.py`
    gt = source.coco_gt()        # the file's own content, for pycocotools

Categories: the file's category ids (e.g. COCO's 1..90 with gaps) are mapped to
contiguous labels 1..K in increasing id order (`label_to_category_id` maps back).
Records keep the order of the file's `images` list; images without annotations are
kept (empty targets), crowd boxes are kept with `is_crowd` True.

Bad input policy (every message names the file and the image / annotation concerned):
- empty file, malformed JSON, a missing top-level key (`images`, `annotations`,
  `categories`) or a missing per-entry key (image `id`/`file_name`/`width`/`height`;
  annotation `id`/`image_id`/`category_id`/`bbox`; category `id`/`name`): ValueError
  naming the file and the key, raised by the constructor.
- an annotation whose `category_id` is not among the categories, or whose `image_id` is
  not among the images, or whose bbox is not 4 finite numbers, or a repeated id: ValueError
  naming the annotation id and the value, raised by the constructor.
  (The structural checks are `frcnn_jax.coco_format.coco_gt_problem`, shared with the evaluation.)
- a bbox with w <= 0 or h <= 0 (or lying entirely outside its image): dropped from the
  records, counted in `stats["dropped"]`, logged once as a summary.
- a bbox partly outside its image: clipped to the image in the records, counted in
  `stats["clipped"]`, logged once as a summary.
- a missing or undecodable image file, or one whose decoded size differs from the file's
  width/height: error when that record is read (FileNotFoundError / ValueError naming the
  file and the image id); images are not checked up front (a dataset of 100k files
  would take long), and nothing is skipped silently.
- with `masks=True`: an annotation without a `segmentation`, or one pycocotools cannot
  decode (empty or malformed polygons, an RLE of another size, runs not covering the
  image), is a ValueError naming the file and the annotation id, raised by the
  constructor (every kept annotation is converted to a compressed RLE up front).
`coco_gt()` returns the file's own content (the dropped and clipped boxes as they are in
the file), so pycocotools reproduces the official numbers.

Images are decoded by `images.decode_image` (PIL, converted to RGB: grayscale, CMYK and
palette files work); EXIF orientation is NOT applied: COCO annotations refer to the stored pixels.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from frcnn_jax.coco_format import coco_gt_problem
from frcnn_jax.data.example import make_example
from frcnn_jax.data.images import decode_image
from frcnn_jax.data.masks import decode_rles, segmentation_to_rle

logger = logging.getLogger(__name__)


def load_coco_json(path: str) -> dict:
    """Reads and structurally checks a COCO annotation file (`coco_format.coco_gt_problem`, training keys).

    Raises:
      FileNotFoundError if the file is missing; ValueError naming the file for an empty
      file, malformed JSON, or the first structural problem (a missing key, an unknown
      category_id / image_id, an invalid bbox, a duplicate id, ...).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        raise ValueError(f"{path}: annotation file is empty")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from e
    problem = coco_gt_problem(data, training=True)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return data


class CocoJsonSource:
    """Random-access source over a COCO JSON file and an image folder.

    Args:
      annotation_file: path of the COCO-format JSON.
      image_dir: folder holding the images' `file_name`s.
      masks: records carry "masks" uint8 [N, H, W] decoded from each annotation's
        `segmentation` (polygons, uncompressed or compressed RLE; pycocotools, as
        `COCO.annToMask`). Held as compressed RLEs in one bytes blob (a few hundred bytes
        per annotation) and decoded per record.

    Attributes:
      num_object_classes, category_names, label_to_category_id, category_id_to_label: category maps.
      image_ids: int64 [len] image id of each record.
      stats: {"dropped": n, "clipped": n} counts of the bad boxes handled (see module doc).
    """

    has_masks = True

    def __init__(self, annotation_file: str, image_dir: str, masks: bool = False):
        self.annotation_file = os.fspath(annotation_file)
        self.image_dir = os.fspath(image_dir)
        self.masks = bool(masks)
        path = self.annotation_file
        data = load_coco_json(path)  # checked: unique ids, known references, valid bboxes

        categories = sorted(data["categories"], key=lambda c: c["id"])
        cat_ids = [int(c["id"]) for c in categories]
        self.category_names = [str(c["name"]) for c in categories]
        self.num_object_classes = len(categories)
        self.label_to_category_id = {i + 1: cid for i, cid in enumerate(cat_ids)}
        self.category_id_to_label = {cid: i + 1 for i, cid in enumerate(cat_ids)}

        images = data["images"]
        self.image_ids = np.array([int(im["id"]) for im in images], np.int64)
        self.file_names = [str(im["file_name"]) for im in images]
        self.heights = np.array([int(im["height"]) for im in images], np.int64)
        self.widths = np.array([int(im["width"]) for im in images], np.int64)
        row_of = {image_id: row for row, image_id in enumerate(self.image_ids.tolist())}

        per_image = [[] for _ in images]
        dropped, clipped = [], []
        for ann in data["annotations"]:
            ann_id, image_id, cat_id, bbox = ann["id"], ann["image_id"], ann["category_id"], ann["bbox"]
            row = row_of[image_id]
            x, y, w, h = (float(v) for v in bbox)
            if w <= 0 or h <= 0:
                dropped.append((ann_id, image_id, bbox, "w or h <= 0"))
                continue
            x1, y1, x2, y2 = x, y, x + w, y + h
            width, height = float(self.widths[row]), float(self.heights[row])
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
                y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
                if x2 <= x1 or y2 <= y1:
                    dropped.append((ann_id, image_id, bbox, "outside the image"))
                    continue
                clipped.append((ann_id, image_id, bbox))
            rle = b""
            if self.masks:
                if "segmentation" not in ann:
                    raise ValueError(f"{path}: annotation id {ann_id} (image id {image_id}) has no 'segmentation'")
                try:
                    rle = segmentation_to_rle(ann["segmentation"], int(self.heights[row]), int(self.widths[row]))[
                        "counts"
                    ]
                except Exception as e:  # pycocotools raises bare Exception / TypeError for unsupported input
                    raise ValueError(
                        f"{path}: annotation id {ann_id} (image id {image_id}): segmentation cannot be decoded ({e})"
                    ) from None
            per_image[row].append((x1, y1, x2, y2, self.category_id_to_label[cat_id], bool(ann.get("iscrowd", 0)), rle))

        # Flat arrays + offsets: compact, and cheap to pickle into worker processes.
        counts = np.array([len(p) for p in per_image], np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        flat = [a for p in per_image for a in p]
        self._boxes = np.array([a[:4] for a in flat], np.float32).reshape(-1, 4)
        self._labels = np.array([a[4] for a in flat], np.int32)
        self._crowd = np.array([a[5] for a in flat], bool)
        # Compressed RLE strings (masks=True) as one blob + offsets: compact, and cheap to pickle.
        rle_lengths = np.array([len(a[6]) for a in flat], np.int64)
        self._rle_offsets = np.concatenate([[0], np.cumsum(rle_lengths)])
        self._rle_blob = b"".join(a[6] for a in flat)
        self.stats = {"dropped": len(dropped), "clipped": len(clipped)}
        if dropped:
            ann_id, image_id, bbox, why = dropped[0]
            logger.warning(
                "%s: dropped %d boxes with w <= 0 or h <= 0 or outside their image (first: annotation id %s, "
                "image id %s, bbox %s, %s)",
                path,
                len(dropped),
                ann_id,
                image_id,
                bbox,
                why,
            )
        if clipped:
            ann_id, image_id, bbox = clipped[0]
            logger.warning(
                "%s: clipped %d boxes partly outside their image (first: annotation id %s, image id %s, bbox %s)",
                path,
                len(clipped),
                ann_id,
                image_id,
                bbox,
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __repr__(self) -> str:
        return f"CocoJsonSource({self.annotation_file!r}, {self.image_dir!r}, images={len(self)})"

    def image_hw(self, index: int) -> tuple[int, int]:
        """(height, width) of record `index` as declared in the JSON (no decoding)."""
        return int(self.heights[index]), int(self.widths[index])

    def targets(self, index: int) -> dict:
        """The record's targets without decoding the image: boxes, labels, is_crowd, difficult."""
        lo, hi = self._offsets[index], self._offsets[index + 1]
        return {
            "boxes": self._boxes[lo:hi].copy(),
            "labels": self._labels[lo:hi].copy(),
            "is_crowd": self._crowd[lo:hi].copy(),
            "difficult": np.zeros(hi - lo, bool),
        }

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r}")
        image_id = int(self.image_ids[index])
        path = os.path.join(self.image_dir, self.file_names[index])
        image = decode_image(path, image_id)
        expected = (int(self.heights[index]), int(self.widths[index]))
        if image.shape[:2] != expected:
            raise ValueError(
                f"image file {path} (image id {image_id}) decodes to (h, w)={image.shape[:2]} but "
                f"{self.annotation_file} declares (height, width)={expected}"
            )
        t = self.targets(index)
        masks = self.instance_masks(index) if self.masks else None
        return make_example(image, t["boxes"], t["labels"], image_id, t["is_crowd"], t["difficult"], masks)

    def instance_masks(self, index: int):
        """uint8 [N, H, W] binary masks of record `index` (needs masks=True), rows as `targets(index)`."""
        if not self.masks:
            raise ValueError(f"{self!r} was built without masks=True")
        height, width = self.image_hw(index)
        lo, hi = self._offsets[index], self._offsets[index + 1]
        rles = [
            {"size": [height, width], "counts": self._rle_blob[self._rle_offsets[k] : self._rle_offsets[k + 1]]}
            for k in range(lo, hi)
        ]
        return decode_rles(rles, height, width)

    def coco_gt(self) -> dict:
        """The annotation file's own content (re-read from disk), for pycocotools' `COCO`."""
        return load_coco_json(self.annotation_file)
