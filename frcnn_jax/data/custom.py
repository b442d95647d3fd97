"""Datasets from Python: the source protocol, its defaults, and `data.source="module:factory"`.

A source is any object with

| member | required | meaning |
| --- | --- | --- |
| `__len__()` | yes | number of images |
| `__getitem__(i)` | yes | the record of image i (0 <= i < len): the dict of `example.py` (`make_example` builds it) |
| `category_names` | yes | the K object class names; label i is `category_names[i - 1]` (no background entry) |
| `num_object_classes` | no | K (default `len(category_names)`) |
| `label_to_category_id` | no | {label: category id} for COCO results (default {i: i}) |
| `coco_gt()` | no | COCO-format ground truth (default: built from every record, `coco_gt_from_targets`) |

`__getitem__` must be deterministic (the same record for the same i: exact resume and
evaluation rely on it) and, when grain worker processes are used (`data.num_workers` > 0,
e.g. "auto" on an accelerator), the source must pickle. The training pipeline shuffles,
resizes, flips and pads; a source returns the image as stored.

Two ways to train and evaluate on one, with no COCO JSON written:

    # 1. from Python: objects
    train_and_evaluate(config, workdir, train_source=my_train, eval_source=my_val)

    # 2. from the config (train.py, eval.py): a factory named "module.path:function",
    #    called as function(split, data_config) -> source, split "train" or "val"
    python train.py --config=... --config.data.source=my_package.data:make_source --workdir=...

`ListSource(records, category_names)` holds records in memory (e.g. a few synthetic images).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from frcnn_jax.data.coco_gt import coco_gt_from_targets

FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory_spec(spec: str) -> bool:
    """True for "module.path:function" (the `data.source` form naming a Python factory)."""
    return bool(FACTORY_PATTERN.match(str(spec)))


def load_factory(spec: str) -> Callable[..., Any]:
    """ "module.path:function" -> the function; ValueError naming `data.source` and the problem."""
    if not is_factory_spec(spec):
        raise ValueError(f"data.source={spec!r}: expected 'module.path:function'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module: one line naming it
        raise ValueError(f"data.source={spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"data.source={spec!r}: {module_name} has no function {attr}")
    return factory


def source_from_factory(spec: str, split: str, data_config) -> Any:
    """Calls the factory of `spec` as factory(split, data_config) and checks the result (`as_source`)."""
    source = load_factory(spec)(split, data_config)
    return as_source(source, f"data.source={spec!r} ({split})")


class SourceAdapter:
    """A protocol object completed with the defaults of the optional members (see the module docstring)."""

    def __init__(self, source):
        self._source = source
        names = [str(n) for n in source.category_names]
        self.category_names = names
        self.num_object_classes = int(getattr(source, "num_object_classes", len(names)))
        mapping = getattr(source, "label_to_category_id", None)
        self.label_to_category_id = (
            {int(k): int(v) for k, v in mapping.items()}
            if mapping is not None
            else {i: i for i in range(1, self.num_object_classes + 1)}
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i) -> dict:
        return self._source[i]

    def coco_gt(self) -> dict:
        if hasattr(self._source, "coco_gt"):
            return self._source.coco_gt()
        return records_coco_gt(self, self.category_names, self.label_to_category_id)

    def __getattr__(self, name):  # e.g. a source's own `kind`
        if name.startswith("_"):  # also keeps unpickling (worker processes) from recursing
            raise AttributeError(name)
        return getattr(self._source, name)


def as_source(source, where: str = "source") -> Any:
    """Checks the protocol's required members and fills in the optional ones.

    Returns `source` itself when it has every member, else a `SourceAdapter`. Raises
    ValueError naming `where` and the missing member, or a count/name mismatch.
    """
    for member in ("__len__", "__getitem__", "category_names"):
        if not hasattr(source, member):
            raise ValueError(f"{where}: {type(source).__name__} has no {member} (see frcnn_jax/data/custom.py)")
    names = list(source.category_names)
    num = getattr(source, "num_object_classes", len(names))
    if num != len(names) or not names:
        raise ValueError(f"{where}: num_object_classes={num} but {len(names)} category_names (need >= 1, equal)")
    if len(source) < 1:
        raise ValueError(f"{where}: the source is empty")
    if all(hasattr(source, m) for m in ("num_object_classes", "label_to_category_id", "coco_gt")):
        return source
    return SourceAdapter(source)


def records_coco_gt(source, category_names: Sequence[str], label_to_category_id) -> dict:
    """COCO ground truth of every record of `source` (reads each record once, images included)."""

    def entries():
        for i in range(len(source)):
            r = source[i]
            h, w = r["image"].shape[:2]
            yield {**r, "height": h, "width": w, "file_name": f"{r['image_id']}.png"}

    return coco_gt_from_targets(entries(), category_names, label_to_category_id)


class ListSource:
    """Records held in memory: a complete source for a few images.

    Args:
      records: the records (`example.make_example` dicts), image_id unique.
      category_names: the K class names (label i = category_names[i - 1]).
      label_to_category_id: optional {label: category id} (default {i: i}).
    """

    def __init__(self, records: Sequence[dict], category_names: Sequence[str], label_to_category_id=None):
        from frcnn_jax.data.example import validate_example

        self.records = list(records)
        self.category_names = [str(n) for n in category_names]
        self.num_object_classes = len(self.category_names)
        for r in self.records:
            validate_example(r, self.num_object_classes)
        ids = [r["image_id"] for r in self.records]
        if len(set(ids)) != len(ids):
            raise ValueError("ListSource: image_id values must be unique")
        self.label_to_category_id = (
            {int(k): int(v) for k, v in label_to_category_id.items()}
            if label_to_category_id is not None
            else {i: i for i in range(1, self.num_object_classes + 1)}
        )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i) -> dict:
        return self.records[i]

    def coco_gt(self) -> dict:
        return records_coco_gt(self, self.category_names, self.label_to_category_id)
