"""Instance masks on the host (numpy + pycocotools): decoding, torchvision's transforms, box crops.

Mask R-CNN's ground truth reaches the device as one S x S crop per instance (the TPU
references' representation: Google's MLPerf Mask R-CNN and TF Model Garden crop each mask
to its box on the host at S = 112), never as full-resolution masks (G x H x W per image:
100 x 800 x 1344 bytes = 108 MB).

What a crop holds, exactly
--------------------------
torchvision resizes each instance mask with nearest-neighbour interpolation to the resized
image (`F.interpolate(mask, scale_factor, recompute_scale_factor=True)`), flips it with the
image, and computes the target of an ROI as `roi_align(mask.float(), roi, (M, M),
spatial_scale=1, sampling_ratio=0 (adaptive), aligned=False)` (`project_masks_on_boxes`).
Under aligned=False, mask pixel k sits at coordinate k and the bilinear mask is non-zero
on (k - 1, k + 1); so a mask whose pixels span rows a..b-1 is zero outside [a - 1, b].

`crop_instance_masks` applies the same nearest resize and flip (as index maps: no
full-resolution resized mask is ever built) and returns, per instance,

    crop = roi_align(resized_flipped_mask, crop_box, (S, S), 1.0, sampling_ratio=0, aligned=False)

with `crop_box` the support [a - 1, b] (per axis) widened by one bin on each side, so the
crop's first and last rows and columns are exactly zero (bin = (b - a + 1) / (S - 2)). This
is torchvision's own target computation with the crop box as the ROI and M = S, computed
exactly (separably: `Ay @ mask_window @ Ax^T / count`). The device
(`frcnn_jax.modeling.mask_head`) samples each ROI's M x M target out of the crop; the
zero border makes its sampling outside the crop agree with the mask being zero there.

The crop is stored as uint8 (round(255 * value)); with the crop box in `gt_mask_boxes`.
"""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_utils

MASK_SCALE = 255  # gt_masks holds round(255 * value) as uint8


# --- decoding (COCO `segmentation`) -----------------------------------------------------------


def _compressed_rle_total(counts: bytes) -> int:
    """Sum of the run lengths of a compressed RLE string (COCO's LEB128-like format).

    pycocotools decodes a string whose runs sum to less than h * w without complaint,
    leaving the rest of the mask uninitialised, so strings are checked here first. Raises
    ValueError for a malformed string or a negative run.
    """
    runs: list[int] = []
    i, n = 0, len(counts)
    while i < n:
        x, shift, more = 0, 0, True
        while more:
            if i >= n:
                raise ValueError("truncated RLE string")
            c = counts[i] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {chr(counts[i])!r} in the RLE string")
            x |= (c & 0x1F) << (5 * shift)
            more = bool(c & 0x20)
            i += 1
            shift += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * shift)
        if len(runs) > 2:  # runs after the third are stored relative to the run two before
            x += runs[-2]
        if x < 0:
            raise ValueError("negative run length in the RLE string")
        runs.append(x)
    return sum(runs)


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
    """A COCO annotation's `segmentation` as one compressed RLE (pycocotools, as `COCO.annToRLE`).

    Args:
      segmentation: polygons (a list of flat [x0, y0, x1, y1, ...] lists, several parts
        merged), an uncompressed RLE ({"size": [h, w], "counts": [int, ...]}) or a
        compressed RLE ({"size": [h, w], "counts": str | bytes}).
      height, width: the image's size.
    Returns:
      {"size": [height, width], "counts": bytes} compressed RLE.
    Raises:
      ValueError saying why the segmentation cannot be decoded (empty or malformed
      polygons, a size other than the image's, run lengths that do not cover h * w).
    """
    h, w = int(height), int(width)
    if isinstance(segmentation, list):
        if not segmentation or not all(isinstance(p, list) for p in segmentation):
            raise ValueError("polygons must be a non-empty list of coordinate lists")
        for part in segmentation:
            if len(part) < 6 or len(part) % 2:
                raise ValueError(f"a polygon needs an even number >= 6 of coordinates, got {len(part)}")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in part):
                raise ValueError("polygon coordinates must be finite numbers")
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        raise ValueError(
            f"expected polygons or an RLE dict with 'size' and 'counts', got {type(segmentation).__name__}"
        )
    size = [int(v) for v in segmentation["size"]]
    if size != [h, w]:
        raise ValueError(f"RLE size {size} differs from the image's (height, width) [{h}, {w}]")
    counts = segmentation["counts"]
    if isinstance(counts, list):
        if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != h * w:
            raise ValueError(f"uncompressed RLE counts must be non-negative ints summing to h * w = {h * w}")
        return mask_utils.frPyObjects(segmentation, h, w)
    if isinstance(counts, str):
        counts = counts.encode("ascii", errors="replace")
    if not isinstance(counts, bytes):
        raise ValueError(f"RLE counts must be a list or a string, got {type(counts).__name__}")
    total = _compressed_rle_total(counts)
    if total != h * w:
        raise ValueError(f"compressed RLE runs sum to {total}, not h * w = {h * w}")
    return {"size": [h, w], "counts": counts}


def decode_rles(rles, height: int, width: int):
    """Compressed RLEs -> uint8 [N, height, width] binary masks (pycocotools `decode`)."""
    if not rles:
        return np.zeros((0, height, width), np.uint8)
    return np.ascontiguousarray(np.moveaxis(mask_utils.decode(list(rles)), -1, 0))


# --- torchvision's mask transforms as index maps ----------------------------------------------


def nearest_indices(in_size: int, out_size: int):
    """Source index of each output index of torch's nearest interpolation along one axis.

    `F.interpolate(mode="nearest")` with the scale recomputed from the sizes (torchvision's
    mask resize): src = min(floor(dst * float32(in / out)), in - 1) in float32; same size:
    the identity. Returns int64 [out_size].
    """
    if in_size == out_size:
        return np.arange(out_size, dtype=np.int64)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def resize_masks_nearest(masks, out_hw: tuple[int, int]):
    """torchvision's mask resize: uint8 [N, H, W] -> uint8 [N, h', w'] (nearest neighbour)."""
    masks = np.asarray(masks)
    rows = nearest_indices(masks.shape[1], int(out_hw[0]))
    cols = nearest_indices(masks.shape[2], int(out_hw[1]))
    return masks[:, rows][:, :, cols]


# --- roi_align of a binary mask, separably ---------------------------------------------------


def roi_align_axis_weights(c1: float, c2: float, out: int, extent: int):
    """torchvision `roi_align` (spatial_scale 1, adaptive sampling, aligned=False) along one axis.

    Args:
      c1, c2: the box's start and end on this axis (pixels).
      out: output bins; extent: the map's size on this axis.
    Returns:
      (weights float32 [out, extent], grid int): weights[p, k] is the summed bilinear weight
      the samples of bin p put on row k (torchvision's rules: samples outside [-1, extent]
      count as zero, below 0 clamp to 0, at or beyond extent - 1 take the last row), and
      grid the samples per bin (ceil(bin size)). The 2-D result is
      Ay @ map @ Ax^T / (grid_y * grid_x).
    """
    f32 = np.float32
    start = f32(c1)
    length = np.maximum(f32(c2) - start, f32(1.0))
    bin_size = length / f32(out)
    grid = max(int(np.ceil(bin_size)), 1)
    p = np.arange(out, dtype=f32)[:, None]
    i = np.arange(grid, dtype=f32)[None, :]
    y = start + p * bin_size + (i + f32(0.5)) * bin_size / f32(grid)  # [out, grid]
    valid = (y >= -1.0) & (y <= extent)
    y = np.maximum(y, f32(0.0))
    low = np.floor(y).astype(np.int64)
    edge = low >= extent - 1
    low = np.where(edge, extent - 1, low)
    high = np.where(edge, extent - 1, low + 1)
    y = np.where(edge, low.astype(f32), y)
    frac = (y - low.astype(f32)).astype(f32)
    weights = np.zeros((out, extent), f32)
    rows = np.broadcast_to(np.arange(out)[:, None], low.shape)
    np.add.at(weights, (rows[valid], low[valid]), (f32(1.0) - frac)[valid])
    np.add.at(weights, (rows[valid], high[valid]), frac[valid])
    return weights, grid


def _support(any_pixels):
    """(a - 1, b) for the True run a..b-1 (first..last) of a 1-D bool array, or None when empty."""
    idx = np.flatnonzero(any_pixels)
    if idx.size == 0:
        return None
    return float(idx[0] - 1), float(idx[-1] + 1)


def _fold(weights, src):
    """Sums the weight columns of runs of equal source indices: ([out, k'] weights, [k'] indices)."""
    starts = np.flatnonzero(np.concatenate([[True], src[1:] != src[:-1]]))
    return np.add.reduceat(weights, starts, axis=1), src[starts]


def crop_instance_masks(masks, resized_hw: tuple[int, int], flip: bool, mask_size: int, fallback_boxes=None):
    """Resized-and-flipped instance masks cropped to their support at S x S (see module doc).

    Args:
      masks: uint8 (or bool) [N, H, W] binary masks at the ORIGINAL image size.
      resized_hw: (h', w') of the resized image (nearest-neighbour resize, torchvision's).
      flip: whether the resized image was flipped horizontally.
      mask_size: S (>= 3).
      fallback_boxes: optional float32 [N, 4] boxes (x1, y1, x2, y2) in the resized,
        flipped frame, used as the crop box of an empty mask (default: a 1-pixel box at 0).
    Returns:
      (crops uint8 [N, S, S] = round(255 * roi_align(mask, crop_box, S)), crop_boxes
      float32 [N, 4] (x1, y1, x2, y2) in the resized, flipped image's pixels). An empty
      mask gives a zero crop. Memory: one instance's window at a time, never h' x w'.
    """
    masks = np.asarray(masks)
    n, height, width = masks.shape
    out_h, out_w = int(resized_hw[0]), int(resized_hw[1])
    s = int(mask_size)
    if s < 3:
        raise ValueError(f"mask_size must be >= 3, got {s}")
    src_rows = nearest_indices(height, out_h)
    src_cols = nearest_indices(width, out_w)
    if flip:
        src_cols = src_cols[::-1]
    crops = np.zeros((n, s, s), np.uint8)
    crop_boxes = np.zeros((n, 4), np.float32)
    for i in range(n):
        mask = masks[i]
        ys = _support(mask.any(axis=1)[src_rows])
        xs = _support(mask.any(axis=0)[src_cols])
        if ys is None or xs is None:
            if fallback_boxes is not None:
                crop_boxes[i] = np.asarray(fallback_boxes, np.float32).reshape(-1, 4)[i]
            else:
                crop_boxes[i] = (0.0, 0.0, 1.0, 1.0)
            continue
        box = []
        for lo, hi in (xs, ys):
            margin = (hi - lo) / (s - 2)  # one bin on each side: the first/last rows of the crop are zero
            box += [lo - margin, hi + margin]
        x1, x2, y1, y2 = box
        crop_boxes[i] = (x1, y1, x2, y2)
        ay, gy = roi_align_axis_weights(np.float32(y1), np.float32(y2), s, out_h)
        ax, gx = roi_align_axis_weights(np.float32(x1), np.float32(x2), s, out_w)
        ry = np.flatnonzero(ay.any(axis=0))
        rx = np.flatnonzero(ax.any(axis=0))
        if ry.size == 0 or rx.size == 0:
            continue
        # Fold the weights of resized rows (columns) that read the same original one: the
        # product then runs on the original mask's window (smaller when upsampling).
        wy, rows = _fold(ay[:, ry[0] : ry[-1] + 1], src_rows[ry[0] : ry[-1] + 1])
        wx, cols = _fold(ax[:, rx[0] : rx[-1] + 1], src_cols[rx[0] : rx[-1] + 1])
        window = mask[np.ix_(rows, cols)].astype(np.float32)
        value = (wy @ window @ wx.T) / np.float32(gy * gx)
        crops[i] = np.clip(np.rint(value * MASK_SCALE), 0, MASK_SCALE).astype(np.uint8)
    return crops, crop_boxes


def pad_masks(crops, crop_boxes, max_gt: int):
    """Pads (or truncates, like `transforms.pad_targets`) crops to G rows.

    Returns: {"gt_masks": uint8 [G, S, S] (zeros in padding), "gt_mask_boxes": float32 [G, 4]
    (zeros in padding)}.
    """
    crops = np.asarray(crops, np.uint8)
    s = crops.shape[-1]
    k = min(crops.shape[0], max_gt)
    out = {"gt_masks": np.zeros((max_gt, s, s), np.uint8), "gt_mask_boxes": np.zeros((max_gt, 4), np.float32)}
    out["gt_masks"][:k] = crops[:k]
    out["gt_mask_boxes"][:k] = np.asarray(crop_boxes, np.float32).reshape(-1, 4)[:k]
    return out


def mask_bytes(max_gt: int, mask_size: int) -> int:
    """Bytes of one image's mask fields in a batch: G x (S x S uint8 + 4 float32)."""
    return int(max_gt) * (int(mask_size) ** 2 + 16)
