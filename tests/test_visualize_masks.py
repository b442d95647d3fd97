"""frcnn_jax/visualize.py masks: translucent fills as torchvision's draw_segmentation_masks, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from frcnn_jax import host_masks
from frcnn_jax.visualize import blend_masks, class_color, draw_detections


def _scene(seed=0, k=6, h=60, w=80):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x1, y1 = rng.uniform(0, w - 20, k), rng.uniform(0, h - 20, k)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, 30, k), y1 + rng.uniform(5, 30, k)], 1).astype(np.float32)
    boxes[:, 2] = boxes[:, 2].clip(0, w)
    boxes[:, 3] = boxes[:, 3].clip(0, h)
    masks = rng.random((k, 28, 28), dtype=np.float32)
    return image, boxes, masks


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_blend_masks_equals_torchvision(torch, alpha):
    from torchvision.utils import draw_segmentation_masks

    image, boxes, masks = _scene()
    dense = host_masks.paste_masks(masks, boxes, image.shape[:2])
    assert (dense.sum(0) > 1).any() and (dense.sum(0) == 1).any()  # overlaps and single cover both tested
    colors = [class_color(k + 1) for k in range(len(dense))]
    ours = blend_masks(image, dense, colors, alpha)
    ref = draw_segmentation_masks(
        torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(dense), alpha=alpha, colors=colors
    )
    ref = ref.permute(1, 2, 0).numpy()
    covered = dense.any(0)
    np.testing.assert_array_equal(ours[covered], ref[covered])
    np.testing.assert_array_equal(ours[~covered], image[~covered])  # outside every mask: untouched
    if alpha == 0.5:
        np.testing.assert_array_equal(ours, ref)


def test_blend_masks_from_crops_and_rles_equals_dense():
    image, boxes, masks = _scene(1)
    hw = image.shape[:2]
    colors = [class_color(k + 3) for k in range(len(masks))]
    dense = blend_masks(image, host_masks.paste_masks(masks, boxes, hw), colors)
    crops = blend_masks(image, host_masks.iter_pasted_masks(masks, boxes, hw), colors)
    rles = blend_masks(image, host_masks.iter_mask_rles(masks, boxes, hw), colors)
    np.testing.assert_array_equal(crops, dense)
    np.testing.assert_array_equal(rles, dense)
    assert (dense != image).any()
    with pytest.raises(ValueError, match="6 masks but 5 colours|more masks than colours"):
        blend_masks(image, host_masks.iter_pasted_masks(masks, boxes, hw), colors[:5])
    with pytest.raises(ValueError, match="masks must be"):
        blend_masks(image, np.zeros((2, 5, 5), bool), colors[:2])


def test_draw_detections_fills_masks_inside_and_leaves_outside():
    h, w = 120, 160
    image = np.full((h, w, 3), 200, np.uint8)
    boxes = np.asarray([[20, 20, 100, 100]], np.float32)
    mask = np.zeros((28, 28), np.float32)
    mask[7:21, 7:21] = 1.0  # the box's central part
    dense = host_masks.paste_masks(mask[None], boxes, (h, w))
    out = np.asarray(
        draw_detections(image, boxes, np.asarray([0.9]), np.asarray([3]), masks=host_masks.iter_mask_rles(mask[None], boxes, (h, w)))
    )  # fmt: skip
    color = np.asarray(class_color(3), np.float32)
    want = (np.float32(200) * np.float32(0.5) + color * np.float32(0.5)).astype(np.uint8)
    ys, xs = np.nonzero(dense[0])
    inside = (slice(int(ys.min()) + 2, int(ys.max()) - 1), slice(int(xs.min()) + 2, int(xs.max()) - 1))
    assert out[inside].shape[0] > 10 and (out[inside] == want).all()
    # outside the mask (inside the box but away from its outline and caption), and outside the box: untouched
    assert not dense[0, 86:95, 86:95].any() and (out[86:95, 86:95] == 200).all() and (out[105:, :] == 200).all()
    no_masks = np.asarray(draw_detections(image, boxes, np.asarray([0.9]), np.asarray([3])))
    assert (no_masks[inside] == 200).all()
