"""Data: sources (shapes, COCO JSON, tfds), numpy transforms and the grain input pipeline.

    from frcnn_jax import data
    source = data.ShapesDataset("train")                     # or CocoJsonSource / TfdsSource
    it = data.build_iterator(source, batch_size=8, canvases=[(128, 128)], min_size=128,
                             max_size=128, max_gt=16, train=True, seed=0)
    batch = next(it)                                         # numpy dict, see pipeline.py

The record format every source returns is documented in `example.py`, the batch format
in `pipeline.py`. `TfdsSource` imports tensorflow_datasets only when constructed.
"""

from frcnn_jax.data.coco_gt import coco_gt_from_targets
from frcnn_jax.data.coco_json import CocoJsonSource
from frcnn_jax.data.example import EXAMPLE_KEYS, make_example, validate_example
from frcnn_jax.data.pipeline import BATCH_KEYS, BatchIterator, build_dataset, build_iterator
from frcnn_jax.data.shapes import SHAPE_NAMES, ShapesDataset
from frcnn_jax.data.tfds_source import TfdsSource
from frcnn_jax.data.transforms import (
    IMAGE_MEAN,
    IMAGE_STD,
    choose_canvas,
    hflip,
    normalize,
    pad_targets,
    pad_to_canvas,
    resize_bilinear,
    resize_boxes,
    resize_image,
    resized_hw,
)

__all__ = [
    "BATCH_KEYS",
    "EXAMPLE_KEYS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SHAPE_NAMES",
    "BatchIterator",
    "CocoJsonSource",
    "ShapesDataset",
    "TfdsSource",
    "build_dataset",
    "build_iterator",
    "choose_canvas",
    "coco_gt_from_targets",
    "hflip",
    "make_example",
    "normalize",
    "pad_targets",
    "pad_to_canvas",
    "resize_bilinear",
    "resize_boxes",
    "resize_image",
    "resized_hw",
    "validate_example",
]
