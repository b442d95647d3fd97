"""Datasets from Python (`frcnn_jax.data.custom`): the protocol's checks and defaults, a
`data.source="module:factory"` config and `train_and_evaluate(train_source=, eval_source=)`,
which train the same numbers and resume exactly."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from frcnn_jax.data import custom
from frcnn_jax.data.example import make_example

sys.path.insert(0, str(REPO / "tests"))
import tiny_config  # noqa: E402

NAMES = ["box", "bar"]


def synthetic_records(split: str, n: int) -> list[dict]:
    """n images with a bright rectangle ("box", label 1) and a dark bar ("bar", label 2) on noise."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    records = []
    for i in range(n):
        h, w = (96, 128) if i % 2 else (128, 96)
        image = rng.integers(60, 120, (h, w, 3), np.uint8)
        x, y = rng.integers(4, 40, 2)
        image[y : y + 40, x : x + 40] = 250
        bx, by = rng.integers(4, 40, 2)
        image[by + 50 : by + 55, bx : bx + 50] = 0
        boxes = [[x, y, x + 40, y + 40], [bx, by + 50, bx + 50, by + 55]]
        records.append(make_example(image, boxes, [1, 2], image_id=100 + i))
    return records


def make_source(split, data_config):
    """The factory `data.source="test_data_custom:make_source"` names."""
    return custom.ListSource(synthetic_records(split, 8 if split == "train" else 4), NAMES)


class MinimalSource:
    """Only the required members: len, getitem, category_names."""

    category_names = NAMES

    def __init__(self, records):
        self._records = records

    def __len__(self):
        return len(self._records)

    def __getitem__(self, i):
        return self._records[i]


def test_protocol_defaults_and_errors():
    records = synthetic_records("val", 2)
    src = custom.as_source(MinimalSource(records), "x")
    assert isinstance(src, custom.SourceAdapter) and src.num_object_classes == 2
    assert src.label_to_category_id == {1: 1, 2: 2} and len(src) == 2
    gt = src.coco_gt()
    assert [im["id"] for im in gt["images"]] == [100, 101] and gt["images"][0]["height"] == 128
    assert [c["name"] for c in gt["categories"]] == NAMES and len(gt["annotations"]) == 4
    assert gt["annotations"][0]["bbox"] == [float(v) for v in records[0]["boxes"][0, :2]] + [40.0, 40.0]
    full = custom.ListSource(records, NAMES)
    assert custom.as_source(full) is full

    with pytest.raises(ValueError, match=r"^train_source: list has no category_names \(see"):
        custom.as_source([records[0]], "train_source")
    with pytest.raises(ValueError, match="image_id values must be unique"):
        custom.ListSource([records[0], records[0]], NAMES)
    with pytest.raises(ValueError, match=r"'labels' must lie in 1..1"):
        custom.ListSource(records, NAMES[:1])
    for spec, message in (
        ("no_such_module_xyz:f", "data.source='no_such_module_xyz:f': cannot import no_such_module_xyz"),
        ("test_data_custom:nope", "data.source='test_data_custom:nope': test_data_custom has no function nope"),
    ):
        with pytest.raises(ValueError, match=message):
            custom.load_factory(spec)
    from frcnn_jax.data import builder

    config = tiny_config.get_config()
    config.data.source = "not a spec"
    with pytest.raises(ValueError, match="data.source='not a spec': must be one of .* or a Python factory"):
        builder.validate_data_config(config.data)


def _config():
    config = tiny_config.get_config()
    config.model.num_classes = 3
    config.data.source = "test_data_custom:make_source"
    config.data.batch_size = 8  # one image per simulated device (conftest: 8 CPU devices)
    config.data.eval_batch_size = 4
    config.data.canvases = ((128, 128),)  # one canvas: one compiled step
    config.data.max_size = 128
    config.data.min_size = (96,)
    config.data.test_min_size = 96
    config.train.num_steps = 3
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    config.train.visualize = 0
    return config


def test_train_from_a_factory_and_from_objects_resume_exactly(tmp_path):
    from frcnn_jax import run_checkpoint
    from frcnn_jax.training.loop import train_and_evaluate

    config = _config()
    full = train_and_evaluate(config, tmp_path / "a")  # data.source names the factory
    assert {"AP", "per_class"} <= set(full) and set(full["per_class"]) == set(NAMES)

    config.data.source = "shapes"  # ignored: the sources are given as objects
    train, val = make_source("train", None), make_source("val", None)
    b = tmp_path / "b"
    assert train_and_evaluate(config, b, train_source=train, eval_source=val, stop_after_steps=1) == {}
    resumed = train_and_evaluate(config, b, train_source=train, eval_source=val)
    params = [run_checkpoint.load_model(w)[1]["params"] for w in (tmp_path / "a", b)]
    for x, y in zip(*map(jax.tree.leaves, params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    assert resumed["AP"] == pytest.approx(full["AP"], abs=1e-6)
    meta = run_checkpoint.load_model(b)[2]
    assert meta["class_names"] == ["__background__", *NAMES]
