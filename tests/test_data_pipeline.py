"""The grain pipeline: batch format, canvas grouping, determinism across workers, state restore, eval, sharding."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from frcnn_jax.data import BATCH_KEYS, CocoJsonSource, ShapesDataset, build_iterator
from frcnn_jax.data import transforms as T
from frcnn_jax.data.transforms import choose_canvas

# Shapes with two scales: 96 -> canvas (96, 96), 128 -> (128, 128), so grouping has work to do.
MULTI = dict(batch_size=4, canvases=[(96, 96), (128, 128)], min_size=(96, 128), max_size=128, max_gt=6)
SINGLE = dict(batch_size=8, canvases=[(128, 128)], min_size=128, max_size=128, max_gt=8)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _check_batch(batch, batch_size, max_gt):
    assert list(batch) == list(BATCH_KEYS)
    b, hc, wc, c = batch["image"].shape
    assert b == batch_size and c == 3 and hc % 32 == 0 and wc % 32 == 0
    dtypes = dict(
        image=np.float32,
        image_size=np.int32,
        orig_size=np.int32,
        boxes=np.float32,
        labels=np.int32,
        gt_valid=np.bool_,
        is_crowd=np.bool_,
        difficult=np.bool_,
        image_id=np.int64,
        valid=np.bool_,
    )
    shapes = dict(
        image_size=(b, 2),
        orig_size=(b, 2),
        boxes=(b, max_gt, 4),
        labels=(b, max_gt),
        gt_valid=(b, max_gt),
        is_crowd=(b, max_gt),
        difficult=(b, max_gt),
        image_id=(b,),
        valid=(b,),
    )
    for key, dtype in dtypes.items():
        assert batch[key].dtype == dtype, key
        if key in shapes:
            assert batch[key].shape == shapes[key], key
    for i in range(b):
        h, w = batch["image_size"][i]
        assert h <= hc and w <= wc
        if not batch["valid"][i]:
            assert (h, w) == (hc, wc) and not batch["gt_valid"][i].any() and batch["image_id"][i] == -1
            continue
        img = batch["image"][i]
        assert np.all(img[h:] == 0) and np.all(img[:, w:] == 0)  # zero padding after normalisation
        g = batch["gt_valid"][i]
        assert np.all(batch["labels"][i][g] > 0) and np.all(batch["labels"][i][~g] == 0)
        bx = batch["boxes"][i][g]
        assert np.all(bx >= -1e-4) and np.all(bx[:, [0, 2]] <= w + 1e-3) and np.all(bx[:, [1, 3]] <= h + 1e-3)
        assert np.all(batch["boxes"][i][~g] == 0)


@pytest.fixture(scope="module")
def coco128(shared):
    root = shared / "data/coco128"
    return CocoJsonSource(root / "annotations.json", root / "images")


def test_shapes_batches_format_and_content():
    source = ShapesDataset("val", num_images=16)
    it = build_iterator(source, train=False, shard_index=0, shard_count=1, **SINGLE)
    batches = list(it)
    it.close()
    assert len(batches) == 2
    for batch in batches:
        _check_batch(batch, 8, 8)
        assert batch["valid"].all()
    ids = np.concatenate([b["image_id"] for b in batches])
    np.testing.assert_array_equal(ids, np.arange(16))  # one canvas: exactly the source order
    ex = source[3]
    b = batches[0]
    np.testing.assert_allclose(b["image"][3], T.normalize(ex["image"]), rtol=0, atol=1e-6)
    n = len(ex["boxes"])
    np.testing.assert_array_equal(b["boxes"][3][:n], ex["boxes"])  # no resize at 128 -> exact
    np.testing.assert_array_equal(b["labels"][3][:n], ex["labels"])
    assert b["gt_valid"][3].sum() == n
    np.testing.assert_array_equal(b["orig_size"][3], [128, 128])


def test_training_flip_and_scales_match_records():
    source = ShapesDataset("train", num_images=8)
    it = build_iterator(source, train=True, seed=5, shard_index=0, shard_count=1, **MULTI)
    batches = _take(it, 6)
    it.close()
    flips = set()
    for batch in batches:
        _check_batch(batch, 4, 6)
        assert batch["valid"].all()
        for i in range(4):
            ex = source[int(batch["image_id"][i])]
            h, w = batch["image_size"][i]
            assert (h, w) in ((96, 96), (128, 128))
            resized, _ = T.resize_image(ex["image"], h, w)
            boxes = T.resize_boxes(ex["boxes"], (128, 128), (h, w))
            n = len(boxes)
            got = batch["boxes"][i][:n]
            if np.allclose(got, boxes):
                flips.add(False)
                np.testing.assert_allclose(batch["image"][i][:h, :w], T.normalize(resized), atol=1e-5)
            else:
                flips.add(True)
                fimg, fboxes = T.hflip(resized, boxes)
                np.testing.assert_allclose(got, fboxes, atol=1e-5)
                np.testing.assert_allclose(batch["image"][i][:h, :w], T.normalize(fimg), atol=1e-5)
    assert flips == {True, False}


def test_one_canvas_per_batch_with_portrait_and_landscape(coco128):
    canvases = [(320, 544), (544, 320)]
    it = build_iterator(
        coco128,
        batch_size=2,
        canvases=canvases,
        min_size=320,
        max_size=533,
        max_gt=64,
        train=True,
        seed=1,
        shard_index=0,
        shard_count=1,
    )
    seen = set()
    for batch in _take(it, 10):
        _check_batch(batch, 2, 64)
        canvas = batch["image"].shape[1:3]
        seen.add(canvas)
        for h, w in batch["image_size"]:
            assert choose_canvas(h, w, canvases) == canvas
        assert batch["is_crowd"].dtype == np.bool_
    it.close()
    assert seen == {(320, 544), (544, 320)}


def test_crowd_boxes_kept_with_flag(coco128):
    row = int(np.flatnonzero(coco128.image_ids == 149)[0])  # has a crowd box

    class One:
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return coco128[row]

    it = build_iterator(
        One(),
        batch_size=1,
        canvases=[(224, 224)],
        min_size=160,
        max_size=224,
        max_gt=32,
        train=True,
        seed=0,
        shard_index=0,
        shard_count=1,
    )
    batch = next(it)
    it.close()
    t = coco128.targets(row)
    assert batch["is_crowd"][0].sum() == t["is_crowd"].sum() >= 1
    assert batch["gt_valid"][0].sum() == len(t["boxes"])


def test_deterministic_with_0_and_2_workers_and_state_restore():
    source = ShapesDataset("train", num_images=40)
    kw = dict(train=True, seed=7, shard_index=0, shard_count=1, **MULTI)
    it0 = build_iterator(source, num_workers=0, **kw)
    it2 = build_iterator(source, num_workers=2, num_threads=1, **kw)
    first0, first2 = _take(it0, 5), _take(it2, 5)
    _assert_same(first0, first2)
    assert {b["image"].shape[1:3] for b in first0} == {(96, 96), (128, 128)}
    for it in (it0, it2):
        state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable
        expected = _take(it, 3)
        it.close()
        resumed = build_iterator(source, num_workers=0 if it is it0 else 2, num_threads=1, **kw)
        resumed.set_state(state)
        _assert_same(_take(resumed, 3), expected)
        resumed.close()
    different = build_iterator(source, num_workers=0, **{**kw, "seed": 8})
    assert not np.array_equal(next(different)["image_id"], first0[0]["image_id"])
    different.close()


def test_state_restore_with_pending_groups():
    source = ShapesDataset("train", num_images=30)
    kw = dict(train=True, seed=3, shard_index=0, shard_count=1, prefetch_batches=0, **MULTI)
    it = build_iterator(source, **kw)
    _take(it, 5)
    state = it.get_state()
    assert sum(len(p) for _, _, p in state["pending"]) > 0  # images waiting in partial groups
    expected = _take(it, 3)
    it.close()
    resumed = build_iterator(source, **kw)
    resumed.set_state(json.loads(json.dumps(state)))
    _assert_same(_take(resumed, 3), expected)
    resumed.close()


def test_epochs_reshuffle_and_cover_the_shard():
    source = ShapesDataset("train", num_images=12)
    it = build_iterator(
        source,
        batch_size=4,
        canvases=[(128, 128)],
        min_size=128,
        max_size=128,
        max_gt=6,
        train=True,
        seed=0,
        shard_index=0,
        shard_count=1,
    )
    ids = np.concatenate([b["image_id"] for b in _take(it, 6)])
    it.close()
    assert sorted(ids[:12]) == list(range(12)) and sorted(ids[12:]) == list(range(12))
    assert not np.array_equal(ids[:12], ids[12:])


def test_eval_covers_every_image_once_with_multiple_canvases(coco128):
    canvases = [(160, 256), (256, 160)]
    it = build_iterator(
        coco128,
        batch_size=5,
        canvases=canvases,
        min_size=160,
        max_size=256,
        max_gt=100,
        train=False,
        shard_index=0,
        shard_count=1,
        num_threads=1,
    )
    batches = list(it)
    it.close()
    ids = []
    for batch in batches:
        _check_batch(batch, 5, 100)
        ids += batch["image_id"][batch["valid"]].tolist()
        assert (batch["image_id"][~batch["valid"]] == -1).all()
        for i in np.flatnonzero(batch["valid"]):
            assert choose_canvas(*batch["image_size"][i], canvases) == batch["image"].shape[1:3]
            row = int(np.flatnonzero(coco128.image_ids == batch["image_id"][i])[0])
            t = coco128.targets(row)
            assert batch["gt_valid"][i].sum() == len(t["boxes"])
            assert tuple(batch["orig_size"][i]) == coco128.image_hw(row)
    assert sorted(ids) == sorted(coco128.image_ids.tolist())
    assert sum((~b["valid"]).sum() for b in batches) == 5 * len(batches) - 128 > 0


def test_per_host_shards_are_disjoint():
    source = ShapesDataset("val", num_images=10)
    per_shard, batch_counts = [], []
    for shard in range(3):
        it = build_iterator(source, train=False, shard_index=shard, shard_count=3, **{**SINGLE, "batch_size": 2})
        batches = list(it)
        it.close()
        ids = np.concatenate([b["image_id"][b["valid"]] for b in batches])
        assert all(i % 3 == shard for i in ids)
        per_shard.append(set(ids.tolist()))
        batch_counts.append(len(batches))
    assert set().union(*per_shard) == set(range(10)) and sum(map(len, per_shard)) == 10
    assert len(set(batch_counts)) == 1  # shards padded to equal length: hosts stay in step
    # Training: each host prepares its rows of the same global batches, whatever the host count.
    train = ShapesDataset("train", num_images=20)
    one = build_iterator(train, train=True, seed=0, shard_index=0, shard_count=1, **{**SINGLE, "batch_size": 6})
    hosts = [
        build_iterator(train, train=True, seed=0, shard_index=i, shard_count=3, **{**SINGLE, "batch_size": 2})
        for i in range(3)
    ]
    for _ in range(5):  # more than an epoch: the reshuffle is global too
        whole = next(one)
        parts = [next(h) for h in hosts]
        for key in ("image", "boxes", "labels", "image_id"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    for it in [one, *hosts]:
        it.close()
    with pytest.raises(ValueError, match="needs a single canvas"):
        build_iterator(train, train=True, seed=0, shard_index=0, shard_count=2, **{**MULTI, "batch_size": 2})


def test_errors_and_truncation_warning(caplog):
    source = ShapesDataset("val", num_images=4, min_objects=3, max_objects=3)
    with caplog.at_level(logging.WARNING, logger="frcnn_jax.data.transforms"):
        it = build_iterator(
            source,
            batch_size=2,
            canvases=[(128, 128)],
            min_size=128,
            max_size=128,
            max_gt=2,
            train=False,
            shard_index=0,
            shard_count=1,
            num_threads=0,
            prefetch_batches=0,
        )
        batch = next(it)
        it.close()
    assert batch["gt_valid"].all() and "image 0 has 3 ground-truth boxes" in caplog.text
    it = build_iterator(
        source,
        batch_size=2,
        canvases=[(96, 96)],
        min_size=128,
        max_size=128,
        max_gt=4,
        train=False,
        shard_index=0,
        shard_count=1,
        num_threads=0,
        prefetch_batches=0,
    )
    with pytest.raises(ValueError, match=r"image id 0 .*\(h, w\)=\(128, 128\).*\(96, 96\)"):
        next(it)
    it.close()
    with pytest.raises(ValueError, match="multiples of 32"):
        build_iterator(source, batch_size=2, canvases=[(100, 128)], min_size=96, max_size=128, train=False)
    with pytest.raises(ValueError, match="shard_index"):
        build_iterator(
            source,
            batch_size=2,
            canvases=[(128, 128)],
            min_size=96,
            max_size=128,
            train=False,
            shard_index=2,
            shard_count=2,
        )


def test_hflip_false_never_flips_and_keeps_shuffle_and_scales():
    source = ShapesDataset("train", num_images=8)
    kw = dict(train=True, seed=5, shard_index=0, shard_count=1, **MULTI)
    with build_iterator(source, hflip=False, **kw) as it:
        plain = _take(it, 6)
    with build_iterator(source, **kw) as it:  # hflip=True, the default
        flipped = _take(it, 6)
    flips = 0
    for a, b in zip(plain, flipped):
        for key in ("image_id", "image_size", "orig_size", "labels", "gt_valid"):  # same images, same scales
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        for i in range(len(a["image_id"])):
            ex = source[int(a["image_id"][i])]
            h, w = a["image_size"][i]
            resized, _ = T.resize_image(ex["image"], h, w)
            boxes = T.resize_boxes(ex["boxes"], (128, 128), (h, w))
            np.testing.assert_allclose(a["boxes"][i][: len(boxes)], boxes, atol=1e-5)
            np.testing.assert_allclose(a["image"][i][:h, :w], T.normalize(resized), atol=1e-5)
            flips += not np.allclose(b["boxes"][i][: len(boxes)], boxes)
    assert flips > 0


def test_data_hflip_config_reaches_the_training_stream():
    from configs import default
    from frcnn_jax.data import builder

    data = default.get_config().data
    data.batch_size, data.canvases, data.min_size, data.max_size, data.num_workers = 4, [(128, 128)], (128,), 128, "0"
    source = ShapesDataset("train", num_images=8)
    data.hflip = False
    with builder.train_iterator(source, data, seed=0, num_hosts=1) as it:
        batch = next(it)
    for i, image_id in enumerate(batch["image_id"]):
        ex = source[int(image_id)]
        np.testing.assert_array_equal(batch["boxes"][i][: len(ex["boxes"])], ex["boxes"])  # 128 px: no resize
    data.hflip = True
    with builder.train_iterator(source, data, seed=0, num_hosts=1) as it:
        batches = _take(it, 2)
    assert any(
        not np.array_equal(b["boxes"][i][: len(source[int(j)]["boxes"])], source[int(j)]["boxes"])
        for b in batches
        for i, j in enumerate(b["image_id"])
    )


_UNCLOSED_WORKERS = r"""
import sys
from absl import flags
from frcnn_jax.data import ShapesDataset, build_iterator

KW = dict(batch_size=2, canvases=[(128, 128)], min_size=128, max_size=128, max_gt=8, train=True, seed=0,
          num_threads=1, shard_index=0, shard_count=1)

if __name__ == "__main__":
    source = ShapesDataset("train", num_images=16)
    try:
        build_iterator(source, num_workers=2, **KW)
    except ValueError as e:
        print("refused:", e)
    flags.FLAGS.mark_as_parsed()  # the script's own choice, as absl.app.run would
    closed = build_iterator(source, num_workers=2, **KW)
    next(closed)
    closed.close()
    kept = build_iterator(source, num_workers=2, **KW)  # never closed: a module global at exit
    print("batch", next(kept)["image"].shape)
"""


def test_worker_iterators_exit_cleanly_and_unparsed_flags_are_refused(tmp_path):
    """num_workers > 0: no grain teardown errors or leaked shared memory at exit, closed or not."""
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "unclosed.py"
    script.write_text(_UNCLOSED_WORKERS)
    repo = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-W", "default", str(script)], capture_output=True, text=True, env=env,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "refused: num_workers=2: grain's worker processes read absl flags" in out.stdout
    assert "batch (2, 128, 128, 3)" in out.stdout
    stderr = _without_third_party_deprecations(out.stderr)
    for bad in ("Exception ignored", "Traceback", "leaked shared_memory", "Warning"):
        assert bad not in stderr, out.stderr[-4000:]


def _without_third_party_deprecations(stderr: str) -> str:
    """stderr less the DeprecationWarnings that installed libraries raise about each other (e.g. orbax on a
    newer jax: `-W default` shows them), with the source line Python prints under each; everything else stays."""
    import re

    kept, skip_source = [], False
    for line in stderr.splitlines():
        if re.search(r"[/\\]site-packages[/\\].*: (Pending)?DeprecationWarning: ", line):
            skip_source = True
            continue
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = False
        kept.append(line)
    return "\n".join(kept)
