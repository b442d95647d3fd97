"""Bilinear ROIAlign with torchvision `roi_align` semantics and static shapes.

How it is computed
------------------
torchvision averages, for every output bin, `gh * gw` bilinear samples. Both the
bilinear weights and the "sample outside the map" rule factor into a y part and an
x part, so for one ROI the whole pooled output is two small matrix products:

    out[p, q, :] = sum_{i, j} Ay[p, i] * Ax[q, j] * F[i, j, :] / count

where Ay[p, i] sums the y-weights that the samples of bin row p put on feature row i
(Ax likewise for columns) and count = gh * gw. Ay and Ax are non-zero only on the
rows / columns the ROI touches, so each ROI reads a window of the feature map
instead of the whole map.

Static shapes: ROIs are sorted into a few window-size buckets (4, 6, 8, 11, 16, ...
cells, up to the feature-map size, so a box covering the whole map has its bucket) and each
bucket is processed in fixed-size chunks inside a `while_loop` that runs only as many
chunks as that bucket holds. Typical ROIs thus cost a small window, and no bound is
guessed: the largest bucket is the feature map itself.

Adaptive sampling (`sampling_ratio <= 0`) uses gh = ceil(roi_h / out_h) samples per
bin, which grows without limit for huge boxes. Only samples inside [-1, H] contribute,
and their number per bin is bounded by the window (samples are at least half a cell
apart when gh >= 2), so each bucket enumerates a static number of samples per bin,
starting at the first one that can land on the map, while `count` keeps the true
gh * gw. Every box gets torchvision's result up to float32 rounding: sample positions are
computed with torchvision's formula, but XLA may fuse a multiply-add or divide by a
reciprocal, so a position can differ from torchvision's by one ulp.

Gradients with respect to the features are the transposed products, scattered back
into the windows (`jax.custom_vjp`); boxes get no gradient, as in torchvision.

Geometry and accumulation run in float32 for float32 and bfloat16 features, and in
float64 for float64 features (only under `jax_enable_x64`), like torchvision's double
kernel; all indices are int32 whether or not x64 is enabled.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.ops import _checks
from frcnn_jax.ops.boxes import compute_dtype

_HIGHEST = jax.lax.Precision.HIGHEST
# Elements of window + intermediate + output per chunk: small enough to stay in cache.
_CHUNK_ELEMENTS = 1 << 19


class _Level(NamedTuple):
    """Static description of one feature level."""

    height: int
    width: int
    scale: float


class _Bucket(NamedTuple):
    """Static window size (kh, kw), samples enumerated per bin (gy, gx), chunk size."""

    kh: int
    kw: int
    gy: int
    gx: int
    chunk: int


def _window_sizes(extent: int) -> list[int]:
    """4, 6, 8, 11, 16, 23, 32, ... (ratio ~sqrt 2) below the extent, then the extent.

    Each size is one compiled loop body; the sqrt(2) steps keep a ROI's window at most
    ~2x the area it needs.
    """
    sizes, k = [], 4.0
    while round(k) * 1.25 < extent:
        sizes.append(int(round(k)))
        k *= math.sqrt(2)
    sizes.append(extent)
    return sizes


def _buckets(level: _Level, channels: int, sampling_ratio: int, output_size: tuple[int, int]) -> list[_Bucket]:
    """Window buckets of one level: square windows 4, 8, 16, ... clipped to the map."""
    buckets = []
    for k in _window_sizes(max(level.height, level.width)):
        kh, kw = min(k, level.height), min(k, level.width)
        if sampling_ratio > 0:
            gy = gx = sampling_ratio
        else:  # valid samples per bin <= 2 * (window + 1) + 1, plus slack for the start index
            gy = min(2 * kh + 6, 2 * level.height + 6)
            gx = min(2 * kw + 6, 2 * level.width + 6)
        oh, ow = output_size
        per_roi = (kh * kw + oh * max(kh, kw) + oh * ow) * channels
        chunk = int(max(1, min(64, 2 ** math.floor(math.log2(max(1, _CHUNK_ELEMENTS // per_roi))))))
        buckets.append(_Bucket(kh, kw, gy, gx, chunk))
    return buckets


class _Geometry(NamedTuple):
    """Per-ROI sampling geometry along one axis, exactly as torchvision computes it."""

    start: jax.Array  # [K] roi_start (feature cells)
    bin: jax.Array  # [K] bin size
    grid: jax.Array  # [K] int32 samples per bin (<= 0: no samples)
    lo: jax.Array  # [K] int32 first feature row/col the samples can touch
    need: jax.Array  # [K] int32 number of rows/cols from `lo` they can touch


def _axis_geometry(c1, c2, scale, out: int, extent: int, sampling_ratio: int, aligned: bool) -> _Geometry:
    dtype = c1.dtype  # the compute dtype: float32, or float64 for float64 features
    offset = jnp.asarray(0.5 if aligned else 0.0, dtype)
    start = c1 * scale - offset
    end = c2 * scale - offset
    length = end - start
    if not aligned:
        length = jnp.maximum(length, jnp.asarray(1.0, dtype))
    bin_size = length / jnp.asarray(out, dtype)
    if sampling_ratio > 0:
        grid = jnp.full(start.shape, sampling_ratio, jnp.int32)
    else:
        grid = jnp.ceil(bin_size).astype(jnp.int32)
    last = start + length  # inverted boxes (aligned=True) sample below `start`
    # Margins: one row below for rounding, the upper bilinear tap plus rounding above.
    lo = jnp.clip(jnp.floor(jnp.minimum(start, last)) - 1, 0, extent - 1).astype(jnp.int32)
    hi = jnp.clip(jnp.floor(jnp.maximum(start, last)) + 2, 0, extent - 1).astype(jnp.int32)
    need = jnp.maximum(hi - lo + 1, 1)
    # Rois that sample nothing still need a (trivial) window; NaN boxes fall to row 0.
    return _Geometry(start, bin_size, grid, lo, need)


def _axis_weights(g: _Geometry, window_start, out: int, extent: int, window: int, samples: int, adaptive: bool):
    """[T, out, window] summed bilinear weights of each bin on window rows.

    g: geometry of T rois; window_start: [T] int32 first feature row of the window.
    Weights are in the geometry's dtype (the compute dtype).
    """
    dtype = g.start.dtype
    start, bin_size, grid = g.start[:, None, None], g.bin[:, None, None], g.grid[:, None, None]
    p = jnp.arange(out, dtype=dtype)[None, :, None]
    bin_start = start + p * bin_size
    s = jnp.arange(samples, dtype=jnp.int32)[None, None, :]
    gridf = grid.astype(dtype)
    if adaptive:
        # First sample index that can reach y >= -1 (one index of slack for rounding).
        step = bin_size / jnp.maximum(gridf, 1.0)
        first = jnp.floor((-1.0 - bin_start) / step - 0.5) - 1.0
        first = jnp.clip(jnp.nan_to_num(first, nan=0.0), 0.0, jnp.maximum(gridf - 1.0, 0.0))
        idx = first.astype(jnp.int32) + s
    else:
        idx = s
    # torchvision: y = roi_start + ph * bin + (iy + .5) * bin / grid (same ops, same precision).
    y = bin_start + ((idx.astype(dtype) + 0.5) * bin_size) / gridf
    valid = (idx < grid) & (y >= -1.0) & (y <= jnp.asarray(extent, dtype))
    y = jnp.maximum(y, 0.0)
    low = jnp.floor(y).astype(jnp.int32)  # y >= 0: floor == (int) truncation
    at_edge = low >= extent - 1
    low = jnp.where(at_edge, extent - 1, low)
    high = jnp.where(at_edge, extent - 1, low + 1)
    y = jnp.where(at_edge, low.astype(dtype), y)
    frac = y - low.astype(dtype)
    w_low = jnp.where(valid, 1.0 - frac, 0.0)
    w_high = jnp.where(valid, frac, 0.0)
    rows = jnp.arange(window, dtype=jnp.int32)[None, None, None, :] + window_start[:, None, None, None]
    onehot_low = (low[..., None] == rows).astype(dtype)
    onehot_high = (high[..., None] == rows).astype(dtype)
    return jnp.einsum("tps,tpsk->tpk", w_low, onehot_low, precision=_HIGHEST) + jnp.einsum(
        "tps,tpsk->tpk", w_high, onehot_high, precision=_HIGHEST
    )


class _Static(NamedTuple):
    levels: tuple[_Level, ...]
    output_size: tuple[int, int]
    sampling_ratio: int
    aligned: bool
    channels: int
    dtype: np.dtype  # compute dtype: float32 (float32 / bfloat16 features) or float64


def _roi_plan(static: _Static, boxes, levels):
    """Geometry, window starts and group order for all rois.

    Returns per-roi geometries per level, and for each (level, bucket) the sorted
    permutation plus group start/end offsets.
    """
    oh, ow = static.output_size
    boxes = boxes.astype(static.dtype)
    geo = []
    group = jnp.zeros(boxes.shape[0], jnp.int32)
    buckets_per_level = [
        _buckets(lv, static.channels, static.sampling_ratio, static.output_size) for lv in static.levels
    ]
    offset = 0
    for li, lv in enumerate(static.levels):
        scale = jnp.asarray(lv.scale, static.dtype)
        gy = _axis_geometry(boxes[:, 1], boxes[:, 3], scale, oh, lv.height, static.sampling_ratio, static.aligned)
        gx = _axis_geometry(boxes[:, 0], boxes[:, 2], scale, ow, lv.width, static.sampling_ratio, static.aligned)
        geo.append((gy, gx))
        bucket = jnp.zeros(boxes.shape[0], jnp.int32)
        for bi, bk in enumerate(buckets_per_level[li][:-1]):
            fits = (gy.need <= bk.kh) & (gx.need <= bk.kw)
            bucket = jnp.where((bucket == bi) & ~fits, bi + 1, bucket)
        group = jnp.where(levels == li, offset + bucket, group)
        offset += len(buckets_per_level[li])
    num_groups = offset
    order = jnp.argsort(group, stable=True).astype(jnp.int32)
    counts = jnp.bincount(group, length=num_groups).astype(jnp.int32)
    ends = jnp.cumsum(counts, dtype=jnp.int32)
    starts = ends - counts
    return geo, buckets_per_level, order, starts, ends


def _take(g: _Geometry, idx) -> _Geometry:
    return _Geometry(*(a[idx] for a in g))


def _window_origin(g: _Geometry, window: int, extent: int):
    return jnp.clip(g.lo, 0, extent - window)


def _for_each_chunk(static: _Static, boxes, levels, body, init):
    """Runs `body(carry, pos, level_index, bucket, roi_idx[T], in_group[T], Ay, Ax, y0, x0)` over all chunks.

    pos is the chunk's offset in the sorted roi order; returns (carry, order).
    """
    num_rois = boxes.shape[0]
    oh, ow = static.output_size
    geo, buckets_per_level, order, starts, ends = _roi_plan(static, boxes, levels)
    adaptive = static.sampling_ratio <= 0
    carry = init
    group = 0
    for li, lv in enumerate(static.levels):
        gy_all, gx_all = geo[li]
        for bk in buckets_per_level[li]:
            start, end = starts[group], ends[group]
            group += 1
            lane = jnp.arange(bk.chunk, dtype=jnp.int32)

            def chunk_body(state, lv=lv, li=li, bk=bk, gy_all=gy_all, gx_all=gx_all, lane=lane, end=end):
                pos, carry = state
                slot = pos + lane
                in_group = slot < end
                idx = order[jnp.minimum(slot, num_rois - 1)]
                gy, gx = _take(gy_all, idx), _take(gx_all, idx)
                y0 = _window_origin(gy, bk.kh, lv.height)
                x0 = _window_origin(gx, bk.kw, lv.width)
                ay = _axis_weights(gy, y0, oh, lv.height, bk.kh, bk.gy, adaptive)
                ax = _axis_weights(gx, x0, ow, lv.width, bk.kw, bk.gx, adaptive)
                count = jnp.maximum(gy.grid * gx.grid, 1).astype(static.dtype)
                ay = ay / count[:, None, None]
                carry = body(carry, pos, li, bk, idx, in_group, ay, ax, y0, x0)
                return pos + bk.chunk, carry

            _, carry = jax.lax.while_loop(lambda s, end=end: s[0] < end, chunk_body, (start, carry))
    return carry, order


def _gather_windows(feat, batch_idx, y0, x0, kh: int, kw: int):
    """[T, kh, kw, C] windows of feat [B, H, W, C] at (batch_idx, y0, x0)."""

    def one(b, y, x):
        # All start indices int32: a Python 0 would be int64 under jax_enable_x64.
        return jax.lax.dynamic_slice(feat, (b, y, x, jnp.int32(0)), (1, kh, kw, feat.shape[-1]))[0]

    return jax.vmap(one)(batch_idx, y0, x0)


def _bmm(a, b):
    """Batched matmul [..., M, K] @ [..., K, N] -> [..., M, N] (canonical layout, no transposes)."""
    nb = a.ndim - 2
    batch = tuple(range(nb))
    return jax.lax.dot_general(a, b, (((nb + 1,), (nb,)), (batch, batch)), precision=_HIGHEST)


def _pool_chunk(window, ay, ax):
    """window [T, kh, kw, C] f32, ay [T, oh, kh], ax [T, ow, kw] -> [T, oh, ow, C].

    Contracts the larger window axis first; every product is a canonical batched
    matmul (the small weight matrix is broadcast over the other spatial axis).
    """
    t, kh, kw, c = window.shape
    oh, ow = ay.shape[1], ax.shape[1]
    if kw <= kh:
        tmp = _bmm(ay, window.reshape(t, kh, kw * c)).reshape(t, oh, kw, c)
        return _bmm(jnp.broadcast_to(ax[:, None], (t, oh, ow, kw)), tmp)
    tmp = _bmm(jnp.broadcast_to(ax[:, None], (t, kh, ow, kw)), window)  # [t, kh, ow, c]
    return _bmm(ay, tmp.reshape(t, kh, ow * c)).reshape(t, oh, ow, c)


def _unpool_chunk(grad, ay, ax):
    """Transpose of `_pool_chunk`: grad [T, oh, ow, C] -> window gradient [T, kh, kw, C]."""
    t, oh, ow, c = grad.shape
    kh, kw = ay.shape[2], ax.shape[2]
    ay_t, ax_t = jnp.swapaxes(ay, 1, 2), jnp.swapaxes(ax, 1, 2)
    if kw <= kh:
        tmp = _bmm(jnp.broadcast_to(ax_t[:, None], (t, oh, kw, ow)), grad)  # [t, oh, kw, c]
        return _bmm(ay_t, tmp.reshape(t, oh, kw * c)).reshape(t, kh, kw, c)
    tmp = _bmm(ay_t, grad.reshape(t, oh, ow * c)).reshape(t, kh, ow, c)
    return _bmm(jnp.broadcast_to(ax_t[:, None], (t, kh, kw, ow)), tmp)


def _forward(static: _Static, feats, boxes, batch_idx, levels):
    num_rois = boxes.shape[0]
    oh, ow = static.output_size
    out_dtype = feats[0].dtype

    def body(out, pos, li, bk, idx, in_group, ay, ax, y0, x0):
        window = _gather_windows(feats[li], batch_idx[idx], y0, x0, bk.kh, bk.kw).astype(static.dtype)
        pooled = _pool_chunk(window, ay, ax).astype(out_dtype)

        # Row-by-row dynamic_update_slice (a contiguous copy each); rows of other groups
        # write back what is already there.
        def write(k, out):
            row = jnp.where(in_group[k], pooled[k], jax.lax.dynamic_index_in_dim(out, idx[k], keepdims=False))
            return jax.lax.dynamic_update_index_in_dim(out, row, idx[k], axis=0)

        return jax.lax.fori_loop(0, idx.shape[0], write, out, unroll=True)

    init = jnp.zeros((num_rois, oh, ow, static.channels), out_dtype)
    return _for_each_chunk(static, boxes, levels, body, init)[0]


def _backward(static: _Static, feats, boxes, batch_idx, levels, grad_out):
    grad_out = grad_out.astype(static.dtype)

    def body(grads, pos, li, bk, idx, in_group, ay, ax, y0, x0):
        g = jnp.where(in_group[:, None, None, None], grad_out[idx], 0.0)
        dwin = _unpool_chunk(g, ay, ax)
        b = batch_idx[idx]

        def add_one(acc, args):
            d, bb, yy, xx = args
            at = (bb, yy, xx, jnp.int32(0))
            cur = jax.lax.dynamic_slice(acc, at, (1,) + d.shape)
            return jax.lax.dynamic_update_slice(acc, cur + d[None], at), None

        level_grad, _ = jax.lax.scan(add_one, grads[li], (dwin, b, y0, x0))
        return grads[:li] + (level_grad,) + grads[li + 1 :]

    init = tuple(jnp.zeros(f.shape, static.dtype) for f in feats)
    grads, _ = _for_each_chunk(static, boxes, levels, body, init)
    return tuple(g.astype(f.dtype) for g, f in zip(grads, feats))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _roi_align_core(static: _Static, feats, boxes, batch_idx, levels):
    return _forward(static, feats, boxes, batch_idx, levels)


def _core_fwd(static, feats, boxes, batch_idx, levels):
    return _forward(static, feats, boxes, batch_idx, levels), (feats, boxes, batch_idx, levels)


def _core_bwd(static, res, grad_out):
    feats, boxes, batch_idx, levels = res
    grads = _backward(static, feats, boxes, batch_idx, levels, grad_out)
    return grads, jnp.zeros_like(boxes), None, None


_roi_align_core.defvjp(_core_fwd, _core_bwd)


def _output_pair(output_size) -> tuple[int, int]:
    pair = (output_size, output_size) if np.ndim(output_size) == 0 else tuple(output_size)
    if len(pair) != 2:
        raise ValueError(f"output_size must be an int or an (h, w) pair, got {output_size!r}")
    for v in pair:
        _checks.check_number("output_size", v, minimum=1, integer=True, allow_traced=False)
    return int(pair[0]), int(pair[1])


def multilevel_roi_align(
    features: Sequence[jax.Array],
    spatial_scales: Sequence[float],
    boxes,
    batch_idx,
    levels,
    output_size,
    sampling_ratio: int = 0,
    aligned: bool = False,
):
    """ROIAlign of rois that each read one image of one feature level.

    The building block under `roi_align` and the FPN pooler: every roi is pooled from
    `features[levels[k]][batch_idx[k]]`; work is done only for the level it names.

    Args:
      features: sequence of L arrays [B, H_l, W_l, C] (NHWC, same B and C).
      spatial_scales: L static floats, feature cells per image pixel (1/16 for C4).
      boxes: [K, 4] float (x1, y1, x2, y2) in image pixels.
      batch_idx: [K] int, image of each roi.
      levels: [K] int in [0, L), level of each roi.
      output_size, sampling_ratio, aligned: as in `roi_align`.
    Returns:
      [K, out_h, out_w, C] in the features' dtype (computed in float32, or float64 when
      the features are float64).
    """
    features = tuple(jnp.asarray(f) for f in features)
    if not features:
        raise ValueError("features must hold at least one feature map")
    if len(spatial_scales) != len(features):
        raise ValueError(
            f"spatial_scales must have one entry per feature level ({len(features)}), got {spatial_scales!r}"
        )
    for i, f in enumerate(features):
        _checks.check_rank(f"features[{i}]", f, 4)
        _checks.check_float(f"features[{i}]", f)
        if f.shape[0] != features[0].shape[0] or f.shape[-1] != features[0].shape[-1]:
            raise ValueError(f"features must share batch and channel sizes, got {[tuple(x.shape) for x in features]}")
        if f.shape[1] < 1 or f.shape[2] < 1:
            raise ValueError(f"features[{i}] has an empty spatial extent: {f.shape}")
    for s in spatial_scales:
        _checks.check_number("spatial_scale", s, minimum=0, allow_traced=False)
        if s == 0:
            raise ValueError("spatial_scale must be positive, got 0")
    _checks.check_rank("boxes", boxes, 2, last_dim=4)
    _checks.check_float("boxes", boxes)
    _checks.check_rank("batch_idx", batch_idx, 1)
    _checks.check_rank("levels", levels, 1)
    _checks.check_same_leading(("boxes", "batch_idx"), boxes, batch_idx)
    _checks.check_same_leading(("boxes", "levels"), boxes, levels)
    _checks.check_number("sampling_ratio", sampling_ratio, integer=True, allow_traced=False)
    if not isinstance(aligned, (bool, np.bool_)):
        raise ValueError(f"aligned must be a bool, got {aligned!r}")
    _checks.check_finite_boxes("boxes", boxes)
    oh, ow = _output_pair(output_size)
    static = _Static(
        levels=tuple(_Level(int(f.shape[1]), int(f.shape[2]), float(s)) for f, s in zip(features, spatial_scales)),
        output_size=(oh, ow),
        sampling_ratio=int(sampling_ratio),
        aligned=bool(aligned),
        channels=int(features[0].shape[-1]),
        dtype=np.dtype(compute_dtype(*features)),
    )
    num_rois = np.shape(boxes)[0]
    if num_rois == 0:
        return jnp.zeros((0, oh, ow, static.channels), features[0].dtype)
    batch_idx = jnp.clip(jnp.asarray(batch_idx).astype(jnp.int32), 0, features[0].shape[0] - 1)
    levels = jnp.clip(jnp.asarray(levels).astype(jnp.int32), 0, len(features) - 1)
    boxes = jax.lax.stop_gradient(jnp.asarray(boxes).astype(static.dtype))
    return _roi_align_core(static, features, boxes, batch_idx, levels)


def roi_align(
    features,
    boxes,
    output_size,
    spatial_scale: float,
    sampling_ratio: int = 0,
    aligned: bool = False,
):
    """Bilinear ROIAlign of one feature map: `torchvision.ops.roi_align` in NHWC.

    Args:
      features: [H, W, C] float32 or bfloat16 (or float64) feature map (one image).
      boxes: [R, 4] float (x1, y1, x2, y2) in image pixels.
      output_size: int or (out_h, out_w), static.
      spatial_scale: static float, feature cells per image pixel (e.g. 1/16).
      sampling_ratio: samples per bin and axis; <= 0 means adaptive,
        ceil(roi_size / output_size) per ROI, exactly as torchvision.
      aligned: if True, shift box coordinates by -0.5 cell (pixel-centre model).
    Returns:
      [R, out_h, out_w, C] in the features' dtype, accumulated in float32 (float64 for
      float64 features, which exist only under `jax_enable_x64`).
      Differentiable with respect to `features`; `boxes` receive no gradient.
      Memory is bounded by the output plus one chunk of feature windows.
    """
    _checks.check_rank("features", features, 3)
    _checks.check_rank("boxes", boxes, 2, last_dim=4)
    num_rois = np.shape(boxes)[0]
    zeros = jnp.zeros((num_rois,), jnp.int32)
    return multilevel_roi_align(
        [jnp.asarray(features)[None]], [spatial_scale], boxes, zeros, zeros, output_size, sampling_ratio, aligned
    )
