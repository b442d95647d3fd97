"""Box arithmetic and the box coder against torchvision."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import ops
from frcnn_jax.testing.inputs import random_boxes

SEEDS = [0, 1, 2]


def _edge_boxes(rng, n):
    """Normal boxes mixed with zero-area, inverted and far-outside boxes."""
    b = random_boxes(rng, n)
    k = n // 5
    b[:k, 2:] = b[:k, :2]  # zero area
    b[k : 2 * k] = b[k : 2 * k][:, [2, 3, 0, 1]]  # inverted
    b[2 * k : 3 * k] += 5000  # outside
    return rng.permutation(b)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,m", [(1, 1), (37, 53), (300, 200)])
def test_box_iou_matches_torchvision(torch, torchvision, seed, n, m):
    rng = np.random.default_rng(seed)
    a, b = _edge_boxes(rng, n), _edge_boxes(rng, m)
    ref = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    got = np.asarray(jax.jit(ops.box_iou)(a, b))
    assert got.shape == (n, m) and got.dtype == np.float32
    # torchvision gives NaN for 0/0 (two empty boxes); we define that IoU as 0.
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got[nan], 0.0)
    np.testing.assert_allclose(got[~nan], ref[~nan], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_box_area_clip_small_match_torchvision(torch, torchvision, seed):
    rng = np.random.default_rng(seed)
    b = _edge_boxes(rng, 500)
    tb = torch.from_numpy(b)
    np.testing.assert_allclose(np.asarray(ops.box_area(b)), torchvision.ops.box_area(tb).numpy(), rtol=1e-6)
    h, w = int(rng.integers(100, 900)), int(rng.integers(100, 900))
    np.testing.assert_array_equal(
        np.asarray(jax.jit(ops.clip_boxes)(b, h, w)), torchvision.ops.clip_boxes_to_image(tb, (h, w)).numpy()
    )
    for min_size in [0.0, 1e-3, 5.0, 40.0]:
        keep = torchvision.ops.remove_small_boxes(tb, min_size).numpy()
        small = np.asarray(ops.small_box_mask(b, min_size))
        np.testing.assert_array_equal(np.nonzero(~small)[0], keep)


def test_clip_boxes_traced_size_and_batch():
    boxes = jnp.array([[[-5.0, -5.0, 50.0, 70.0]], [[10.0, 10.0, 500.0, 500.0]]])
    sizes = jnp.array([[40, 60], [300, 200]])
    out = jax.jit(jax.vmap(lambda b, s: ops.clip_boxes(b, s[0], s[1])))(boxes, sizes)
    np.testing.assert_array_equal(out, [[[0, 0, 50, 40]], [[10, 10, 200, 300]]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_torchvision(torch, seed, weights):
    from torchvision.models.detection._utils import BoxCoder

    rng = np.random.default_rng(seed)
    anchors = random_boxes(rng, 2000, min_size=4)
    gt = random_boxes(rng, 2000, min_size=4)
    coder = BoxCoder(weights)
    ref = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()
    got = np.asarray(jax.jit(lambda g, a: ops.encode_boxes(g, a, weights))(gt, anchors))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    # Large deltas exercise the dw/dh clamp at log(1000/16).
    deltas = rng.normal(0, 3, (2000, 4)).astype(np.float32) * np.array(weights, np.float32)
    ref = coder.decode_single(torch.from_numpy(deltas), torch.from_numpy(anchors)).numpy()
    got = np.asarray(jax.jit(lambda d, a: ops.decode_boxes(d, a, weights))(deltas, anchors))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    assert np.isfinite(got).all()


def test_decode_class_specific_broadcast(torch):
    from torchvision.models.detection._utils import BoxCoder

    rng = np.random.default_rng(3)
    props = random_boxes(rng, 64, min_size=4)
    deltas = rng.normal(0, 1, (64, 5 * 4)).astype(np.float32)
    ref = BoxCoder((10.0, 10.0, 5.0, 5.0)).decode_single(torch.from_numpy(deltas), torch.from_numpy(props))
    got = ops.decode_boxes(deltas.reshape(64, 5, 4), props[:, None, :], (10.0, 10.0, 5.0, 5.0))
    np.testing.assert_allclose(np.asarray(got).reshape(64, 20), ref.numpy(), rtol=1e-5, atol=1e-3)


def test_encode_decode_roundtrip_and_clip_default():
    rng = np.random.default_rng(4)
    a = random_boxes(rng, 100, min_size=8)
    b = random_boxes(rng, 100, min_size=8)
    np.testing.assert_allclose(ops.decode_boxes(ops.encode_boxes(b, a), a), b, rtol=1e-4, atol=1e-2)
    big = ops.decode_boxes(jnp.array([[0.0, 0.0, 100.0, 100.0]]), jnp.array([[0.0, 0.0, 16.0, 16.0]]))
    np.testing.assert_allclose(big[0, 2] - big[0, 0], 1000.0, rtol=1e-5)  # exp(log(1000/16)) * 16
    assert math.isclose(ops.boxes.DEFAULT_SCALE_CLAMP, math.log(1000 / 16))


@pytest.mark.parametrize("fn", ["iou", "decode", "encode", "clip"])
def test_bfloat16_inputs(fn):
    rng = np.random.default_rng(5)
    a = random_boxes(rng, 50, min_size=8)
    b = random_boxes(rng, 50, min_size=8)
    a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
    a32, b32 = a16.astype(jnp.float32), b16.astype(jnp.float32)
    f = {
        "iou": ops.box_iou,
        "decode": lambda x, y: ops.decode_boxes(x / 100, y),
        "encode": ops.encode_boxes,
        "clip": lambda x, y: ops.clip_boxes(x, 600, 500),
    }[fn]
    got = jax.jit(f)(a16, b16)
    assert got.dtype == jnp.bfloat16
    ref = f(a32, b32)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)


def test_vmap_over_batch_matches_loop():
    rng = np.random.default_rng(6)
    a = np.stack([random_boxes(rng, 20) for _ in range(3)])
    b = np.stack([random_boxes(rng, 30) for _ in range(3)])
    got = jax.jit(jax.vmap(ops.box_iou))(a, b)
    for i in range(3):
        np.testing.assert_allclose(got[i], ops.box_iou(a[i], b[i]), rtol=1e-6)


def test_box_ops_compile_once():
    traces = []

    def f(a, b, d):
        traces.append(1)
        return ops.box_iou(a, b), ops.decode_boxes(d, a), ops.encode_boxes(b, a), ops.small_box_mask(a, 1.0)

    jf = jax.jit(f)
    rng = np.random.default_rng(8)
    for _ in range(3):
        a, b = random_boxes(rng, 16, min_size=4), random_boxes(rng, 16, min_size=4)
        jf(a, b, rng.normal(size=(16, 4)).astype(np.float32))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.box_iou(np.zeros((3, 3)), np.zeros((2, 4))), "boxes1"),
        (lambda: ops.box_iou(np.zeros((3, 4)), np.zeros((2, 2, 4))), "boxes2"),
        (lambda: ops.box_area(np.zeros((3,))), "boxes"),
        (lambda: ops.small_box_mask(np.zeros((3, 4)), -1.0), "min_size"),
        (lambda: ops.encode_boxes(np.zeros((3, 4)), np.zeros((3, 4)), (1.0, 1.0, 1.0)), "weights"),
        (lambda: ops.decode_boxes(np.zeros((3, 4)), np.zeros((3, 4)), (1.0, 0.0, 1.0, 1.0)), "weights"),
        (lambda: ops.decode_boxes(np.zeros((3, 3)), np.zeros((3, 4))), "deltas"),
        (lambda: ops.clip_boxes(np.zeros((3, 5)), 10, 10), "boxes"),
    ],
)
def test_box_ops_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.x64  # float64: only with FRCNN_TEST_X64=1 (tests/test_ops_x64.py)
def test_float64_inputs_match_torchvision(torch, torchvision):
    """float64 boxes are computed and returned in float64 (torchvision's double results)."""
    from torchvision.models.detection._utils import BoxCoder

    rng = np.random.default_rng(7)
    a = _edge_boxes(rng, 200).astype(np.float64) + rng.uniform(0, 1e-3, (200, 4))
    b = random_boxes(rng, 100, min_size=4).astype(np.float64) + rng.uniform(0, 1e-3, (100, 4))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    iou = jax.jit(ops.box_iou)(a, b)
    assert iou.dtype == np.float64
    ref = torchvision.ops.box_iou(ta, tb).numpy()
    nan = np.isnan(ref)
    np.testing.assert_allclose(np.asarray(iou)[~nan], ref[~nan], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ops.box_area(a), torchvision.ops.box_area(ta).numpy(), rtol=1e-12)
    clipped = torchvision.ops.clip_boxes_to_image(ta, (500, 700)).numpy()
    np.testing.assert_array_equal(ops.clip_boxes(a, 500, 700), clipped)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    enc = jax.jit(lambda x, y: ops.encode_boxes(x, y, (10.0, 10.0, 5.0, 5.0)))(b, b[::-1])
    assert enc.dtype == np.float64
    np.testing.assert_allclose(enc, coder.encode_single(tb, tb.flip(0)).numpy(), rtol=1e-12, atol=1e-12)
    deltas = rng.normal(0, 3, (100, 4)) * np.array([10.0, 10.0, 5.0, 5.0])
    dec = jax.jit(lambda d, y: ops.decode_boxes(d, y, (10.0, 10.0, 5.0, 5.0)))(deltas, b)
    assert dec.dtype == np.float64
    np.testing.assert_allclose(dec, coder.decode_single(torch.from_numpy(deltas), tb).numpy(), rtol=1e-12, atol=1e-9)
    # float32 inputs stay float32 under x64 (no silent promotion)
    assert ops.box_iou(a.astype(np.float32), b.astype(np.float32)).dtype == np.float32
    assert ops.decode_boxes(deltas.astype(np.float32), b.astype(np.float32)).dtype == np.float32
