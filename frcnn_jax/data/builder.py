"""Sources and iterators from a config's `data` section (configs/common.py lists the fields).

    source = build_source(config.data, split="train")
    it = train_iterator(source, config.data, seed=config.seed)      # endless, with get/set_state
    for batch in eval_iterator(val_source, config.data): ...        # every image once

The only place where config fields become pipeline arguments.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from frcnn_jax.data import custom, transforms
from frcnn_jax.data.pipeline import build_iterator

SOURCES = ("shapes", "coco_json", "tfds")
SPLITS = ("train", "val")


def validate_data_config(data) -> None:
    """Raises ValueError naming the first bad `data.*` field."""

    def fail(field, why):
        raise ValueError(f"data.{field}={data[field]!r}: {why}")

    if data.source not in SOURCES and not custom.is_factory_spec(data.source):
        fail("source", f"must be one of {SOURCES} or a Python factory 'module.path:function'")
    for name in ("batch_size", "eval_batch_size", "max_gt", "max_size", "test_min_size"):
        if int(data[name]) < 1:
            fail(name, "must be >= 1")
    sizes = (data.min_size,) if np.isscalar(data.min_size) else tuple(data.min_size)
    if not sizes or min(sizes) < 1:
        fail("min_size", "must be a positive size or a non-empty tuple of them")
    try:
        resolve_num_workers(data.num_workers, backend="cpu", cpu_count=1)
    except ValueError as e:
        fail("num_workers", str(e))
    try:
        transforms.check_canvases(data.canvases)
        # every image the resize rule can produce (training and evaluation sizes) has a canvas
        transforms.check_canvases_cover(data.canvases, (*sizes, int(data.test_min_size)), int(data.max_size))
    except ValueError as e:
        raise ValueError(
            f"data.canvases={data.canvases!r}: {e} (data.min_size={data.min_size!r}, "
            f"data.test_min_size={data.test_min_size!r}, data.max_size={data.max_size!r})"
        ) from None
    if data.get("masks", False):
        if int(data.get("mask_size", 112)) < 3:
            fail("mask_size", "must be >= 3")
        # built-in sources are checked here; a Python factory's source when it is built (build_source)
        if data.source in SOURCES and not _source_class(data.source).has_masks:
            name = f"tfds {data.tfds.name}" if data.source == "tfds" else data.source
            raise ValueError(
                f"data.masks=True: the source {name} (data.source={data.source!r}) carries no instance masks; "
                "use data.source=coco_json (COCO JSON segmentations) or shapes"
            )
    if data.source == "coco_json":
        for split in SPLITS:
            for key in (f"{split}_annotations", f"{split}_images"):
                if not data.coco_json[key]:
                    raise ValueError(
                        f"data.coco_json.{key} is empty: set it to the COCO JSON / image folder of the {split} split"
                    )


def resolve_num_workers(value, *, backend: str, cpu_count: int) -> int:
    """`data.num_workers` -> the number of grain worker processes.

    An integer >= 0 is used as given (0: images are prepared by threads of the training
    process). "auto": 0 on the CPU backend, where the model's computation already uses
    every core and worker processes would only compete with it; on an accelerator
    backend half the host's cores, between 1 and 16 (`min(16, max(1, cpu_count // 2))`),
    leaving the other half to the training process, its prefetch threads and XLA.
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return 0 if backend == "cpu" else min(16, max(1, int(cpu_count) // 2))
        if not value.strip().isdigit():
            raise ValueError('must be "auto" or an integer >= 0')
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError('must be "auto" or an integer >= 0')
    return int(value)


def _num_workers(data) -> int:
    import jax  # only here: the rest of the data package does not need JAX

    workers = resolve_num_workers(data.num_workers, backend=jax.default_backend(), cpu_count=os.cpu_count() or 1)
    if workers and str(data.num_workers).strip().lower() == "auto":
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (train.py / eval.py parse them)
            logging.getLogger(__name__).warning(
                "data.num_workers=auto: absl flags are not parsed (not under absl.app.run), so grain cannot start "
                "%d worker processes; preparing images in this process instead (parse the flags to use workers)",
                workers,
            )
            return 0
    return workers


def source_has_masks(name: str) -> bool:
    """Whether the built-in source `name` (one of SOURCES) carries instance masks (shapes, coco_json: yes; tfds: no)."""
    return bool(_source_class(name).has_masks)


def _source_class(name: str):
    """The source class of `data.source` (importing it does not import tensorflow_datasets)."""
    if name == "shapes":
        from frcnn_jax.data.shapes import ShapesDataset

        return ShapesDataset
    if name == "coco_json":
        from frcnn_jax.data.coco_json import CocoJsonSource

        return CocoJsonSource
    from frcnn_jax.data.tfds_source import TfdsSource

    return TfdsSource


def masks_wanted(data, split: str = "train") -> bool:
    """Whether the `split` source carries instance masks: `data.masks`, both splits.

    Training crops them into the batches; the val source's masks give shapes' `coco_gt()`
    its segmentations (COCO JSON's is the file itself), and COCO JSON sources check every
    segmentation when built, so a bad one in either file stops the run before it writes.
    """
    del split
    return bool(data.get("masks", False))


def build_source(data, split: str = "train") -> Any:
    """The random-access source of `split` ("train" or "val") described by `data`.

    `data.source` is "shapes", "coco_json", "tfds", or "module.path:function": a Python
    factory called as function(split, data) that returns a source (`custom.py`). With
    `data.masks` the training source carries instance masks (records' "masks"); a source
    without masks (tfds, or a factory's source whose `has_masks` is not true) is a
    ValueError naming it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    masks = masks_wanted(data, split)
    if masks and data.source in SOURCES and not _source_class(data.source).has_masks:
        validate_data_config(data)  # raises the error naming the source
    if data.source == "shapes":
        from frcnn_jax.data.shapes import ShapesDataset

        s = data.shapes
        size = int(s.image_size)
        num = int(s.num_train if split == "train" else s.num_val)
        return ShapesDataset(split=split, seed=int(s.seed), num_images=num, image_size=(size, size), masks=masks)
    if data.source == "coco_json":
        from frcnn_jax.data.coco_json import CocoJsonSource

        c = data.coco_json
        return CocoJsonSource(c[f"{split}_annotations"], c[f"{split}_images"], masks=masks)
    if data.source == "tfds":
        from frcnn_jax.data.tfds_source import TfdsSource

        t = data.tfds
        return TfdsSource(t.name, t.train_split if split == "train" else t.val_split, data_dir=t.data_dir or None)
    if custom.is_factory_spec(data.source):
        source = custom.source_from_factory(data.source, split, data)
        if masks and not getattr(source, "has_masks", False):
            raise ValueError(
                f"data.masks=True: the source of data.source={data.source!r} carries no instance masks "
                "(its has_masks is not true)"
            )
        return source
    raise ValueError(f"data.source={data.source!r}: must be one of {SOURCES} or 'module.path:function'")


def _min_sizes(data):
    return (int(data.min_size),) if np.isscalar(data.min_size) else tuple(int(s) for s in data.min_size)


def train_iterator(source, data, *, seed: int, num_hosts: int | None = None):
    """Endless shuffled, augmented batches of the host's share of `data.batch_size`.

    Augmentation: random min_size (a tuple `data.min_size`) and, with `data.hflip`, a
    horizontal flip with p = 0.5. With `data.masks`, batches add "gt_masks" uint8
    [B, G, S, S] and "gt_mask_boxes" float32 [B, G, 4] (S = `data.mask_size`; pipeline.py).
    """
    import jax

    hosts = jax.process_count() if num_hosts is None else num_hosts
    if data.batch_size % hosts:
        raise ValueError(f"data.batch_size={data.batch_size} must be divisible by the number of hosts ({hosts})")
    return build_iterator(
        source,
        batch_size=data.batch_size // hosts,
        canvases=data.canvases,
        min_size=_min_sizes(data),
        max_size=int(data.max_size),
        max_gt=int(data.max_gt),
        train=True,
        hflip=bool(data.hflip),
        seed=int(seed),
        num_workers=_num_workers(data),
        mask_size=int(data.mask_size) if data.get("masks", False) else 0,
    )


def eval_iterator(source, data, *, max_images: int = 0, shard_index: int = 0, shard_count: int = 1):
    """Every image of `source` once (or the first `max_images`), batches padded with valid=False.

    shard_index / shard_count: this host's share (images shard_index::shard_count); every
    shard yields the same number of batches when the data has a single canvas.
    """
    if max_images:
        source = _Prefix(source, max_images)
    it = build_iterator(
        source,
        batch_size=int(data.eval_batch_size),
        canvases=data.canvases,
        min_size=int(data.test_min_size),
        max_size=int(data.max_size),
        max_gt=int(data.max_gt),
        train=False,
        num_workers=_num_workers(data),
        shard_index=shard_index,
        shard_count=shard_count,
    )
    try:
        yield from it
    finally:
        it.close()


class _Prefix:
    """The first `n` records of a source (same attributes)."""

    def __init__(self, source, n: int):
        self._source, self._n = source, min(int(n), len(source))

    def __len__(self):
        return self._n

    def __getitem__(self, i):
        if not 0 <= i < self._n:
            raise IndexError(i)
        return self._source[i]

    def __getattr__(self, name):
        if name.startswith("_"):  # also keeps unpickling (worker processes) from recursing
            raise AttributeError(name)
        return getattr(self._source, name)
