"""Host-side transforms: torch parity of the resize, box/flip consistency, canvases, GT padding."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from PIL import Image

from frcnn_jax.data import transforms as T

SIZES = [
    # (h, w, min_size, max_size): upscale, long-side capped, downscale, square, tiny, odd ratios
    (480, 640, 800, 1333),
    (640, 427, 800, 1333),
    (200, 640, 800, 1333),
    (1000, 3000, 600, 1000),
    (500, 500, 333, 333),
    (37, 91, 20, 100),
    (7, 5, 64, 1000),
    (128, 128, 96, 96),
]


def _torch_resize(torch, image_hwc, min_size, max_size):
    """torchvision's GeneralizedRCNNTransform resize on a float HWC image -> HWC numpy."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    t = GeneralizedRCNNTransform(min_size, max_size, list(T.IMAGE_MEAN), list(T.IMAGE_STD))
    t.eval()
    chw = torch.from_numpy(np.ascontiguousarray(image_hwc.transpose(2, 0, 1)))
    out, _ = t.resize(chw, None)
    return out.numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("h,w,min_size,max_size", SIZES)
def test_resize_matches_torchvision_on_random_images(torch, h, w, min_size, max_size):
    image = np.random.default_rng(h * 7 + w).random((h, w, 3), dtype=np.float32)
    ours, hw = T.resize_image(image, min_size, max_size)
    ref = _torch_resize(torch, image, min_size, max_size)
    assert ours.shape == ref.shape and hw == ref.shape[:2]
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)  # measured: <= 2e-7


def test_resize_matches_torch_interpolate_on_photo(torch, shared):
    photo = np.asarray(Image.open(shared / "data/coco128/images/000000000009.jpg").convert("RGB"))
    image = photo.astype(np.float32) / 255.0
    scale = min(800 / min(image.shape[:2]), 1333 / max(image.shape[:2]))
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image.transpose(2, 0, 1))[None],
            scale_factor=scale,
            mode="bilinear",
            recompute_scale_factor=True,
            align_corners=False,
        )[0]
        .numpy()
        .transpose(1, 2, 0)
    )
    ours, hw = T.resize_image(image, 800, 1333)
    assert hw == (800, 1066) == ref.shape[:2]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    # uint8 input: same result on the 0..255 scale.
    ours_u8, _ = T.resize_image(photo, 800, 1333)
    np.testing.assert_allclose(ours_u8 / 255.0, ours, rtol=0, atol=1e-5)


def test_resized_hw_matches_torchvision_sizes(torch):
    rng = np.random.default_rng(0)
    for h, w in [(480, 640), (427, 640), (333, 500), (600, 600), (200, 640), *rng.integers(16, 2000, (40, 2)).tolist()]:
        ref = _torch_resize(torch, np.zeros((h, w, 1), np.float32), 800, 1333).shape[:2]
        assert T.resized_hw(h, w, 800, 1333) == ref, (h, w)


def test_same_size_resize_is_exact_copy():
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out, hw = T.resize_image(image, 20, 30)
    assert hw == (20, 30)
    np.testing.assert_array_equal(out, image.astype(np.float32))


def test_resize_boxes_matches_torchvision(torch):
    from torchvision.models.detection.transform import resize_boxes

    boxes = np.array([[10.5, 20.25, 300.0, 400.75], [0, 0, 640, 480]], np.float32)
    ours = T.resize_boxes(boxes, (480, 640), (800, 1066))
    ref = resize_boxes(torch.from_numpy(boxes), [480, 640], [800, 1066]).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_resized_boxes_follow_the_pixels():
    image = np.zeros((60, 90, 3), np.uint8)
    image[12:30, 40:71] = 255  # a block covering rows 12..29, columns 40..70
    box = np.array([[40, 12, 71, 30]], np.float32)
    out, hw = T.resize_image(image, 120, 1000)
    rbox = T.resize_boxes(box, (60, 90), hw)[0]
    x1, y1, x2, y2 = rbox
    inside = out[math.ceil(y1) + 1 : math.floor(y2) - 1, math.ceil(x1) + 1 : math.floor(x2) - 1]
    assert inside.min() == 255.0
    outside = out.copy()  # bilinear upsampling bleeds by at most one output pixel
    outside[math.floor(y1) - 1 : math.ceil(y2) + 1, math.floor(x1) - 1 : math.ceil(x2) + 1] = 0
    assert outside.max() == 0.0


def test_hflip_image_and_boxes_consistent():
    image = np.zeros((10, 20, 3), np.uint8)
    image[2:5, 3:8] = 7  # columns 3..7 -> box x in [3, 8)
    boxes = np.array([[3, 2, 8, 5]], np.float32)
    flipped, fboxes = T.hflip(image, boxes)
    np.testing.assert_array_equal(fboxes, [[12, 2, 17, 5]])
    cols = np.flatnonzero(flipped[..., 0].any(axis=0))
    assert (cols[0], cols[-1] + 1) == (12, 17)
    back, bboxes = T.hflip(flipped, fboxes)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(bboxes, boxes)


def test_flip_commutes_with_resize():
    image = np.random.default_rng(2).random((33, 47, 3), dtype=np.float32)
    a, _ = T.resize_image(T.hflip(image, np.zeros((0, 4)))[0], 50, 100)
    b = T.hflip(T.resize_image(image, 50, 100)[0], np.zeros((0, 4)))[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # equal up to float32 rounding of the taps


def test_normalize_matches_torchvision(torch):
    image = np.random.default_rng(3).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    ours = T.normalize(image)
    t = torch.from_numpy(image.astype(np.float32) / 255.0)
    ref = ((t - torch.tensor(T.IMAGE_MEAN)) / torch.tensor(T.IMAGE_STD)).numpy()
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    buf = image.astype(np.float32)
    assert T.normalize(buf, out=buf) is buf
    np.testing.assert_allclose(buf, ref, rtol=0, atol=1e-6)


def test_choose_canvas_smallest_area_and_error():
    canvases = [(1344, 1344), (800, 1344), (1344, 800), (800, 800)]
    assert T.choose_canvas(800, 1066, canvases) == (800, 1344)
    assert T.choose_canvas(1066, 800, canvases) == (1344, 800)
    assert T.choose_canvas(800, 800, canvases) == (800, 800)
    assert T.choose_canvas(1000, 1000, canvases) == (1344, 1344)
    assert T.choose_canvas(100, 100, [(128, 256), (256, 128)]) == (128, 256)  # tie: first
    with pytest.raises(ValueError, match=r"\(h, w\)=\(900, 1400\).*\(1344, 1344\)"):
        T.choose_canvas(900, 1400, canvases)
    with pytest.raises(ValueError, match="multiples of 32"):
        T.check_canvases([(800, 1000)])


def test_pad_to_canvas():
    image = np.ones((3, 5, 3), np.float32)
    out = T.pad_to_canvas(image, (32, 64))
    assert out.shape == (32, 64, 3) and out.dtype == np.float32
    assert out[:3, :5].min() == 1 and out.sum() == image.sum()
    with pytest.raises(ValueError, match="does not fit"):
        T.pad_to_canvas(np.ones((40, 5, 3)), (32, 64))


def test_pad_targets_padding_and_truncation(caplog):
    boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = T.pad_targets(boxes, [1, 2, 3], [False, True, False], 5, difficult=[True, False, False])
    assert out["boxes"].shape == (5, 4) and out["boxes"].dtype == np.float32
    np.testing.assert_array_equal(out["boxes"][:3], boxes)
    np.testing.assert_array_equal(out["boxes"][3:], 0)
    np.testing.assert_array_equal(out["labels"], [1, 2, 3, 0, 0])
    assert out["labels"].dtype == np.int32
    np.testing.assert_array_equal(out["gt_valid"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["is_crowd"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["difficult"], [1, 0, 0, 0, 0])
    with caplog.at_level(logging.WARNING, logger="frcnn_jax.data.transforms"):
        cut = T.pad_targets(boxes, [1, 2, 3], [False] * 3, 2, image_id=4242)
    assert "4242" in caplog.text and "3 ground-truth boxes" in caplog.text
    np.testing.assert_array_equal(cut["labels"], [1, 2])
    assert cut["gt_valid"].all()
    empty = T.pad_targets(np.zeros((0, 4)), [], [], 3)
    assert not empty["gt_valid"].any()
