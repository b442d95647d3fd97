"""ROIAlign against torchvision.ops.roi_align: values, gradients, memory, jit/vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import ops
from frcnn_jax.ops.roi_align import multilevel_roi_align

RTOL = 1e-5  # relative to the largest output magnitude (float32 accumulation order differs)
# float64 (only under jax_enable_x64, FRCNN_TEST_X64=1): computed in float64 like torchvision's double kernel.
X64 = jax.config.read("jax_enable_x64")
DTYPES = ["float32", "float64"] if X64 else ["float32"]
RTOL64 = 1e-9


def _boxes(rng, n, h, w, scale, kind):
    img_h, img_w = h / scale, w / scale
    if kind == "normal":  # partly outside, some tiny, some covering the whole map
        wh = np.exp(rng.uniform(np.log(1), np.log(max(img_h, img_w) * 1.3), (n, 2)))
        c = rng.uniform([-40, -40], [img_w + 40, img_h + 40], (n, 2))
        b = np.concatenate([c - wh / 2, c + wh / 2], 1)
    elif kind == "huge":  # far beyond the map: adaptive grids of tens of samples per bin and axis
        b = rng.uniform(-5 * img_w, 5 * img_w, (n, 4))
        b[:, 2:] = b[:, :2] + np.abs(rng.uniform(0, 10 * img_w, (n, 2)))
    elif kind == "outside":  # entirely outside the map
        b = rng.uniform(0, 50, (n, 4)) + np.array([img_w + 100, img_h + 100, img_w + 200, img_h + 200])
    elif kind == "degenerate":  # zero-area and inverted
        b = rng.uniform(0, img_w, (n, 4))
        b[: n // 2, 2:] = b[: n // 2, :2]
    else:
        raise ValueError(kind)
    return b.astype(np.float32)


def _torch_roi_align(torch, torchvision, feat_hwc, boxes, out, scale, sr, aligned, grad=None):
    f = torch.from_numpy(np.ascontiguousarray(feat_hwc.transpose(2, 0, 1)))[None].requires_grad_(grad is not None)
    rois = torch.cat([torch.zeros(len(boxes), 1, dtype=f.dtype), torch.from_numpy(boxes)], 1)
    y = torchvision.ops.roi_align(f, rois, out, scale, sr, aligned)
    if grad is None:
        return y.permute(0, 2, 3, 1).detach().numpy(), None
    y.backward(torch.from_numpy(np.ascontiguousarray(grad.transpose(0, 3, 1, 2))))
    return y.permute(0, 2, 3, 1).detach().numpy(), f.grad[0].permute(1, 2, 0).numpy()


def _assert_close(got, ref, rtol=RTOL):
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(got - ref).max()) / scale if ref.size else 0.0
    assert err <= rtol, f"max error {err:.3g} x max|ref| exceeds {rtol}"


CASES = [
    # (H, W, C, R per kind, output, scale, sampling_ratio)
    (13, 17, 3, 30, (7, 6), 1 / 16, 0),
    (13, 17, 3, 30, (7, 6), 1 / 16, 2),
    (25, 19, 4, 40, 14, 1 / 8, 0),
    (25, 19, 4, 40, 5, 1 / 8, 3),
    (1, 9, 2, 10, 3, 1 / 4, 0),
    (50, 67, 8, 60, 14, 1 / 16, 0),
]
KINDS = ["normal", "outside", "degenerate", "huge"]
# Far-outside "huge" boxes (coordinates up to 15x the image) sample at float32
# positions of ~1e3 cells, where one ulp moves a sample by ~1e-4 cells; torchvision's
# own float32 result differs from its float64 one by ~1e-4 there.
HUGE_RTOL = 3e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_forward_and_grad_match_torchvision(torch, torchvision, case, aligned, dtype):
    h, w, c, r, out, scale, sr = case
    rng = np.random.default_rng(abs(hash((case, aligned))) % 2**32)
    feat = rng.standard_normal((h, w, c)).astype(dtype)
    parts = []
    for kind in KINDS:
        b = _boxes(rng, r, h, w, scale, kind)
        if kind == "degenerate" and aligned and sr <= 0:
            # torchvision's CPU kernel cannot run inverted boxes here (negative sample
            # grid, it raises); keep the zero-area ones, whose output is 0.
            b = b[: r // 2]
        parts.append(b)
    kinds = np.concatenate([[k] * len(b) for k, b in zip(KINDS, parts)])
    boxes = np.concatenate(parts).astype(dtype)
    out_hw = (out, out) if isinstance(out, int) else out
    grad = rng.standard_normal((len(boxes),) + out_hw + (c,)).astype(dtype)
    ref, ref_grad = _torch_roi_align(torch, torchvision, feat, boxes, out, scale, sr, aligned, grad)

    fn = jax.jit(lambda f, b: ops.roi_align(f, b, out, scale, sr, aligned))
    got, vjp = jax.vjp(lambda f: fn(f, jnp.asarray(boxes)), jnp.asarray(feat))
    assert got.shape == ref.shape and got.dtype == dtype
    got = np.asarray(got)
    for kind in KINDS:
        rows = kinds == kind
        err = np.abs(got[rows] - ref[rows]).max() / np.abs(ref).max()
        tol = RTOL64 if dtype == "float64" else HUGE_RTOL if kind == "huge" else RTOL
        assert err <= tol, f"{kind}: relative error {err:.3g}"
    got_grad = vjp(jnp.asarray(grad))[0]
    assert got_grad.dtype == dtype
    _assert_close(np.asarray(got_grad), ref_grad, RTOL64 if dtype == "float64" else RTOL)


def test_roi_align_box_covering_whole_map_uses_every_sample(torch, torchvision):
    # 1 box spanning the whole C4 map: ceil(50 / 14) x ceil(67 / 14) samples per bin.
    rng = np.random.default_rng(11)
    feat = rng.standard_normal((50, 67, 16)).astype(np.float32)
    boxes = np.array([[0, 0, 67 * 16, 50 * 16], [-300, -200, 2000, 1500]], np.float32)
    ref, _ = _torch_roi_align(torch, torchvision, feat, boxes, 14, 1 / 16, 0, False)
    _assert_close(np.asarray(jax.jit(lambda f, b: ops.roi_align(f, b, 14, 1 / 16, 0, False))(feat, boxes)), ref)


def test_roi_align_bfloat16(torch, torchvision):
    rng = np.random.default_rng(12)
    feat = jnp.asarray(rng.standard_normal((20, 24, 8)), jnp.bfloat16)
    boxes = _boxes(rng, 40, 20, 24, 1 / 16, "normal")
    got = jax.jit(lambda f, b: ops.roi_align(f, b, 7, 1 / 16, 0, False))(feat, boxes)
    assert got.dtype == jnp.bfloat16
    ref, _ = _torch_roi_align(torch, torchvision, np.asarray(feat, np.float32), boxes, 7, 1 / 16, 0, False)
    _assert_close(np.asarray(got, np.float32), ref, rtol=1e-2)
    g = jax.jit(jax.grad(lambda f: ops.roi_align(f, boxes, 7, 1 / 16, 0, False).astype(jnp.float32).sum()))(feat)
    assert g.dtype == jnp.bfloat16 and np.isfinite(np.asarray(g, np.float32)).all()


def test_roi_align_empty_rois():
    out = ops.roi_align(jnp.ones((5, 5, 3)), jnp.zeros((0, 4)), 7, 1.0)
    assert out.shape == (0, 7, 7, 3)


def test_roi_align_vmap_and_compile_once():
    rng = np.random.default_rng(13)
    feats = rng.standard_normal((3, 12, 15, 4)).astype(np.float32)
    boxes = np.stack([_boxes(rng, 25, 12, 15, 1 / 8, "normal") for _ in range(3)])
    traces = []

    def f(fs, bs):
        traces.append(1)
        return jax.vmap(lambda f1, b1: ops.roi_align(f1, b1, 7, 1 / 8, 0, True))(fs, bs)

    jf = jax.jit(f)
    out = jf(feats, boxes)
    single = jax.jit(lambda f1, b1: ops.roi_align(f1, b1, 7, 1 / 8, 0, True))
    for i in range(3):
        _assert_close(np.asarray(out[i]), np.asarray(single(feats[i], boxes[i])))
    jf(feats * 2, boxes + 3.0)
    assert len(traces) == 1
    # gradients through vmap equal per-image gradients
    g = jax.jit(jax.grad(lambda fs: jf(fs, boxes).sum()))(feats)
    single_grad = jax.jit(jax.grad(lambda f1, b1: single(f1, b1).sum()))
    for i in range(3):
        _assert_close(np.asarray(g[i]), np.asarray(single_grad(feats[i], boxes[i])))


def test_multilevel_matches_per_level(torch, torchvision):
    rng = np.random.default_rng(14)
    feats = [rng.standard_normal((2, 32 // s, 40 // s, 6)).astype(np.float32) for s in (1, 2, 4)]
    boxes = _boxes(rng, 90, 32, 40, 1 / 4, "normal")
    batch = rng.integers(0, 2, 90).astype(np.int32)
    levels = rng.integers(0, 3, 90).astype(np.int32)
    scales = [1 / 4, 1 / 8, 1 / 16]
    got = np.asarray(
        jax.jit(lambda f, b, i, lv: multilevel_roi_align(f, scales, b, i, lv, 7, 2, False))(feats, boxes, batch, levels)
    )
    for k in range(90):
        ref, _ = _torch_roi_align(
            torch, torchvision, feats[levels[k]][batch[k]], boxes[k : k + 1], 7, scales[levels[k]], 2, False
        )
        _assert_close(got[k : k + 1], ref)


def test_roi_align_memory_is_bounded_for_c4_size():
    """1000 rois at 14x14 from a [50, 67, 1024] map: temporaries stay far below the output."""
    f = jax.jit(lambda feat, b: ops.roi_align(feat, b, 14, 1 / 16, 0, False))
    feat = jax.ShapeDtypeStruct((50, 67, 1024), jnp.float32)
    boxes = jax.ShapeDtypeStruct((1000, 4), jnp.float32)
    stats = f.lower(feat, boxes).compile().memory_analysis()
    assert stats.output_size_in_bytes == 1000 * 14 * 14 * 1024 * 4
    assert stats.temp_size_in_bytes < 64 * 2**20, stats

    def fwd_bwd(feat, b, g):
        out, vjp = jax.vjp(lambda x: ops.roi_align(x, b, 14, 1 / 16, 0, False), feat)
        return out, vjp(g)[0]

    g = jax.ShapeDtypeStruct((1000, 14, 14, 1024), jnp.float32)
    stats = jax.jit(fwd_bwd).lower(feat, boxes, g).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 64 * 2**20, stats


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.roi_align(jnp.ones((1, 5, 5, 3)), jnp.zeros((2, 4)), 7, 1.0), "features"),
        (lambda: ops.roi_align(jnp.ones((5, 5, 3)), jnp.zeros((2, 5)), 7, 1.0), "boxes"),
        (lambda: ops.roi_align(jnp.ones((5, 5, 3)), jnp.zeros((2, 4)), 0, 1.0), "output_size"),
        (lambda: ops.roi_align(jnp.ones((5, 5, 3)), jnp.zeros((2, 4)), 7, -1.0), "spatial_scale"),
        (lambda: ops.roi_align(jnp.ones((5, 5, 3)), jnp.zeros((2, 4)), 7, 1.0, 1.5), "sampling_ratio"),
        (lambda: ops.roi_align(jnp.ones((5, 5, 3)), jnp.array([[0, 0, np.inf, 1.0]]), 7, 1.0), "finite"),
        (lambda: ops.roi_align(jnp.ones((5, 5, 3), jnp.int32), jnp.zeros((2, 4)), 7, 1.0), "floating"),
    ],
)
def test_roi_align_rejects_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
