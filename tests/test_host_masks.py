"""frcnn_jax/host_masks.py: pasting masks into the image, against torchvision's `paste_masks_in_image`.

torch's CPU `F.interpolate` kernels contract some multiply-adds into FMAs depending on the
CPU build (AVX2 / AVX-512) and the output size, so its floats are not bit-reproducible
across machines; ours are the plain float32 formula. The contract tested: probabilities
within 1e-5 of torch's (measured: <= 2e-6), and thresholded masks equal wherever torch's
probability is more than 1e-5 away from the threshold (a "tie" pixel may differ).
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from frcnn_jax import host_masks

TOL = 1e-5


def _random_boxes(rng, k, h, w, clip=True):
    """[k, 4] float32 boxes of every size class: tiny (< 1 px), small, large, larger than the image, on the border."""
    centre = rng.uniform(-0.1, 1.1, size=(k, 2)) * (w, h)
    size = rng.uniform(0.0, 1.0, size=(k, 2)) * (w, h) * rng.choice([0.002, 0.05, 0.3, 1.0, 3.0], size=(k, 1))
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    if clip:  # detections are clipped to the image: many land exactly on the border
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h)
    return boxes.astype(np.float32)


def _torch_paste(torch, masks, boxes, hw):
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    out = paste_masks_in_image(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), hw)
    return out[:, 0].numpy()


def _assert_matches_torch(ours, ref, threshold=0.5):
    assert ours.shape == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=TOL)
    away = np.abs(ref - threshold) > TOL
    np.testing.assert_array_equal((ours > threshold)[away], (ref > threshold)[away])


@pytest.mark.parametrize("m", [14, 28])
@pytest.mark.parametrize("hw", [(480, 640), (37, 53)])
def test_paste_matches_torchvision(torch, m, hw):
    rng = np.random.default_rng(m + hw[0])
    h, w = hw
    boxes = _random_boxes(rng, 60, h, w)
    # hand-picked: the whole image, each border, sub-pixel boxes, a point, a box far larger than the image
    special = [[0, 0, w, h], [0, 0, 5.5, 7.25], [w - 3.7, h - 2.2, w, h], [0.3, 0.3, 0.9, 0.6],
               [w / 2, h / 2, w / 2, h / 2], [-3 * w, -2 * h, 4 * w, 3 * h], [w - 1, 0, w, h]]  # fmt: skip
    boxes = np.concatenate([boxes, np.asarray(special, np.float32)])
    masks = rng.random((len(boxes), m, m), dtype=np.float32)
    ref = _torch_paste(torch, masks, boxes, hw)
    ours = host_masks.paste_masks(masks, boxes, hw, threshold=None)
    _assert_matches_torch(ours, ref)
    assert ref.max() > 0.9 and (ref[-1] > 0).any()  # real work was compared, incl. the huge box
    binary = host_masks.paste_masks(masks, boxes, hw)
    assert binary.dtype == bool and binary.shape == ref.shape
    np.testing.assert_array_equal(binary, ours > 0.5)


def test_paste_smooth_masks_threshold_exactly_like_torch(torch):
    """Realistic (smooth, mostly saturated) masks: the binary masks are identical."""
    rng = np.random.default_rng(3)
    h, w = 300, 400
    boxes = _random_boxes(rng, 60, h, w)
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    cx, cy, r = rng.uniform(0.2, 0.8, (3, 60, 1, 1))
    masks = (1 / (1 + np.exp(-8 * (r - np.hypot(xx - cx, yy - cy)) * 4))).astype(np.float32)
    ref = _torch_paste(torch, masks, boxes, (h, w))
    _assert_matches_torch(host_masks.paste_masks(masks, boxes, (h, w), threshold=None), ref)
    np.testing.assert_array_equal(host_masks.paste_masks(masks, boxes, (h, w)), ref > 0.5)


def test_expanded_boxes_equal_torchvision(torch):
    from torchvision.models.detection.roi_heads import expand_boxes

    rng = np.random.default_rng(0)
    boxes = _random_boxes(rng, 2000, 800, 1000, clip=False)
    boxes[:500] = np.round(boxes[:500] * 2) / 2  # exact halves: truncation boundaries
    for m in (14, 28):
        ref = expand_boxes(torch.from_numpy(boxes), (m + 2) / m).to(torch.int64).numpy()
        np.testing.assert_array_equal(host_masks.expand_boxes_int(boxes, m), ref)


def test_paste_mask_crop_is_the_clipped_box_region():
    mask = np.ones((28, 28), np.float32)
    crop, y0, x0 = host_masks.paste_mask(mask, np.asarray([10.0, 20.0, 38.0, 48.0]), (100, 200))
    ex = host_masks.expand_boxes_int(np.asarray([[10.0, 20.0, 38.0, 48.0]]), 28)[0]
    assert (x0, y0) == (ex[0], ex[1]) and crop.shape == (ex[3] - ex[1] + 1, ex[2] - ex[0] + 1)
    # a box beyond the image: the crop is clipped to the image, never the box's full size
    crop, y0, x0 = host_masks.paste_mask(mask, np.asarray([-5000.0, -4000.0, 9000.0, 7000.0]), (100, 200))
    assert (y0, x0) == (0, 0) and crop.shape == (100, 200)
    # a box entirely outside the image pastes nothing (torchvision's slicing fails there)
    for box in ([300.0, 10.0, 320.0, 30.0], [-50.0, -40.0, -20.0, -10.0]):
        crop, _, _ = host_masks.paste_mask(mask, np.asarray(box), (100, 200))
        assert crop.size == 0
    assert not host_masks.paste_masks(mask[None], np.asarray([[300.0, 10.0, 320.0, 30.0]]), (100, 200)).any()


def test_paste_masks_empty_and_bad_shapes():
    out = host_masks.paste_masks(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (5, 7))
    assert out.shape == (0, 5, 7) and out.dtype == bool
    assert list(host_masks.iter_mask_rles(np.zeros((0, 28, 28)), np.zeros((0, 4)), (5, 7))) == []
    with pytest.raises(ValueError, match=r"masks must be \[K, M, M\]"):
        host_masks.paste_masks(np.zeros((2, 28, 14)), np.zeros((2, 4)), (5, 7))
    with pytest.raises(ValueError, match="threshold must be a number"):
        next(host_masks.iter_mask_rles(np.zeros((1, 28, 28)), np.zeros((1, 4)), (5, 7), threshold=None))
    with pytest.raises(ValueError, match="2 masks but 3 boxes"):
        host_masks.paste_masks(np.zeros((2, 28, 28)), np.zeros((3, 4)), (5, 7))


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_rle_round_trip(threshold):
    rng = np.random.default_rng(7)
    h, w = 123, 77
    boxes = _random_boxes(rng, 40, h, w)
    masks = rng.random((40, 14, 14), dtype=np.float32)
    dense = host_masks.paste_masks(masks, boxes, (h, w), threshold=threshold)
    rles = list(host_masks.iter_mask_rles(masks, boxes, (h, w), threshold=threshold))
    assert len(rles) == 40 and dense.any()
    for rle, want in zip(rles, dense):
        assert rle["size"] == [h, w] and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), want)
        np.testing.assert_array_equal(mask_utils.decode(rle), want)  # pycocotools also takes str counts
