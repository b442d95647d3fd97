"""Padded, tiled NMS against torchvision.ops.nms / batched_nms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import ops
from frcnn_jax.testing.inputs import clustered_boxes, distinct_scores, random_boxes


def _tv_nms(torch, torchvision, boxes, scores, thr):
    return torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores), thr).numpy()


def _kept(idx):
    idx = np.asarray(idx)
    assert idx.dtype == np.int32
    k = int((idx >= 0).sum())
    assert (idx[k:] == -1).all(), "padding must follow the kept indices"
    return idx[:k]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 7, 300, 2500])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_torchvision(torch, torchvision, seed, n, thr):
    rng = np.random.default_rng(1000 * seed + n)
    boxes = clustered_boxes(rng, n) if seed % 2 else random_boxes(rng, n)
    scores = distinct_scores(rng, n)
    ref = _tv_nms(torch, torchvision, boxes, scores, thr)
    got = _kept(jax.jit(lambda b, s: ops.nms(b, s, thr, n))(boxes, scores))
    np.testing.assert_array_equal(got, ref)


def test_nms_12000_boxes_truncated(torch, torchvision):
    rng = np.random.default_rng(7)
    boxes = clustered_boxes(rng, 12000)
    scores = distinct_scores(rng, 12000)
    ref = _tv_nms(torch, torchvision, boxes, scores, 0.7)
    for max_output in [1, 100, 2000, 12000]:
        got = np.asarray(ops.nms(boxes, scores, 0.7, max_output))
        np.testing.assert_array_equal(got[: min(max_output, len(ref))], ref[:max_output])
        assert (got[len(ref) :] == -1).all()


def test_nms_edge_cases(torch, torchvision):
    # identical boxes: all suppressed but the best
    boxes = np.tile(np.array([[10, 10, 50, 50]], np.float32), (20, 1))
    scores = distinct_scores(np.random.default_rng(0), 20)
    got = _kept(ops.nms(boxes, scores, 0.5, 10))
    np.testing.assert_array_equal(got, [int(np.argmax(scores))])
    # zero-area and inverted boxes never suppress (IoU 0 or NaN), as in torchvision
    rng = np.random.default_rng(1)
    b = random_boxes(rng, 200)
    b[:50, 2:] = b[:50, :2]
    b[50:100] = b[50:100][:, [2, 3, 0, 1]]
    s = distinct_scores(rng, 200)
    np.testing.assert_array_equal(_kept(ops.nms(b, s, 0.5, 200)), _tv_nms(torch, torchvision, b, s, 0.5))
    # fewer boxes than max_output, threshold 0 and > 1
    for thr in [0.0, 1.5]:
        np.testing.assert_array_equal(_kept(ops.nms(b, s, thr, 500)), _tv_nms(torch, torchvision, b, s, thr))


def test_nms_empty_and_padding():
    out = ops.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 5)
    np.testing.assert_array_equal(out, [-1] * 5)
    rng = np.random.default_rng(2)
    b = random_boxes(rng, 64)
    s = distinct_scores(rng, 64)
    valid = np.zeros(64, bool)
    np.testing.assert_array_equal(ops.nms(b, s, 0.5, 8, valid=valid), [-1] * 8)
    # padded rows (valid=False) never appear and never suppress
    valid = rng.random(64) < 0.5
    got = _kept(ops.nms(b, s, 0.5, 64, valid=valid))
    sub = np.nonzero(valid)[0]
    ref = sub[_kept(ops.nms(b[sub], s[sub], 0.5, 64))]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n,classes", [(50, 3), (3000, 80)])
def test_batched_nms_matches_torchvision(torch, torchvision, seed, n, classes):
    rng = np.random.default_rng(seed)
    boxes = clustered_boxes(rng, n, clusters=10)
    scores = distinct_scores(rng, n)
    cls = rng.integers(0, classes, n).astype(np.int32)
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cls.astype(np.int64)), 0.5
    ).numpy()
    got = _kept(jax.jit(lambda b, s, c: ops.batched_nms(b, s, c, 0.5, n))(boxes, scores, cls))
    np.testing.assert_array_equal(got, ref)
    top = np.asarray(ops.batched_nms(boxes, scores, cls, 0.5, 100))
    np.testing.assert_array_equal(top[: min(100, len(ref))], ref[:100])


def test_nms_bfloat16_matches_float32_of_rounded_inputs(torch, torchvision):
    rng = np.random.default_rng(3)
    b = jnp.asarray(clustered_boxes(rng, 500), jnp.bfloat16)
    s = jnp.asarray(distinct_scores(rng, 500), jnp.bfloat16)
    b32, s32 = np.asarray(b, np.float32), np.asarray(s, np.float32)
    # bfloat16 scores have ties; compare on the tie-free subset order via stable sort semantics
    got = _kept(ops.nms(b, s, 0.6, 500))
    np.testing.assert_array_equal(got, _kept(ops.nms(b32, s32, 0.6, 500)))
    order = np.argsort(-s32, kind="stable")
    ref = order[_tv_nms(torch, torchvision, b32[order], np.linspace(1, 0, 500, dtype=np.float32), 0.6)]
    np.testing.assert_array_equal(got, ref)


def test_nms_vmap_and_compile_once():
    rng = np.random.default_rng(4)
    boxes = np.stack([clustered_boxes(rng, 300) for _ in range(4)])
    scores = np.stack([distinct_scores(rng, 300) for _ in range(4)])
    traces = []

    def f(b, s):
        traces.append(1)
        return jax.vmap(lambda bb, ss: ops.nms(bb, ss, 0.5, 50))(b, s)

    jf = jax.jit(f)
    out = jf(boxes, scores)
    for i in range(4):
        np.testing.assert_array_equal(out[i], ops.nms(boxes[i], scores[i], 0.5, 50))
    jf(boxes + 1.0, scores[::-1].copy())
    assert len(traces) == 1


def test_nms_traced_threshold():
    rng = np.random.default_rng(5)
    b, s = clustered_boxes(rng, 200), distinct_scores(rng, 200)
    f = jax.jit(lambda b, s, t: ops.nms(b, s, t, 200))
    for thr in [0.3, 0.7]:
        np.testing.assert_array_equal(f(b, s, thr), ops.nms(b, s, thr, 200))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.nms(np.zeros((3, 4), np.float32), np.zeros((3,), np.float32), -0.1, 5), "iou_threshold"),
        (lambda: ops.nms(np.zeros((3, 4), np.float32), np.zeros((3,), np.float32), 0.5, 0), "max_output"),
        (lambda: ops.nms(np.zeros((3, 4), np.float32), np.zeros((3,), np.float32), 0.5, 2.5), "max_output"),
        (lambda: ops.nms(np.zeros((3, 5), np.float32), np.zeros((3,), np.float32), 0.5, 5), "boxes"),
        (lambda: ops.nms(np.zeros((3, 4), np.float32), np.zeros((4,), np.float32), 0.5, 5), "scores"),
        (lambda: ops.nms(np.zeros((3, 4), np.float32), np.zeros((3, 1), np.float32), 0.5, 5), "scores"),
        (lambda: ops.nms(np.array([[0, 0, np.nan, 1]], np.float32), np.zeros((1,), np.float32), 0.5, 5), "finite"),
        (
            lambda: ops.batched_nms(
                np.zeros((3, 4), np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32), 0.5, 2
            ),
            "class_ids",
        ),
    ],
)
def test_nms_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.x64  # float64: only with FRCNN_TEST_X64=1 (tests/test_ops_x64.py)
@pytest.mark.parametrize("n,thr", [(300, 0.5), (2500, 0.7)])
def test_nms_float64_matches_torchvision(torch, torchvision, n, thr):
    """float64 boxes keep float64 IoUs, as torchvision's double kernel; indices stay int32."""
    rng = np.random.default_rng(n)
    boxes = clustered_boxes(rng, n).astype(np.float64) + rng.uniform(-1e-3, 1e-3, (n, 4))
    scores = distinct_scores(rng, n).astype(np.float64)
    got = _kept(jax.jit(lambda b, s: ops.nms(b, s, thr, n))(boxes, scores))
    np.testing.assert_array_equal(got, _tv_nms(torch, torchvision, boxes, scores, thr))
    cls = rng.integers(0, 5, n)  # int64 under x64
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cls), thr
    ).numpy()
    got = _kept(jax.jit(lambda b, s, c: ops.batched_nms(b, s, c, thr, n))(boxes, scores, cls))
    np.testing.assert_array_equal(got, ref)
