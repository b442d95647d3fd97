"""Anchors against torchvision's AnchorGenerator (values and index order)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from frcnn_jax import ops


@pytest.mark.parametrize(
    "image_hw,feature_hw,sizes,ratios",
    [
        ((800, 1088), (50, 68), (32, 64, 128, 256, 512), (0.5, 1.0, 2.0)),  # C4, COCO: 15 anchors
        ((600, 1000), (38, 63), (128, 256, 512), (0.5, 1.0, 2.0)),  # C4, VOC: 9 anchors
        ((800, 1066), (50, 67), (32, 64), (0.25, 1.0, 3.0)),  # unpadded: stride 16 x 15
        ((256, 320), (64, 80), (32,), (0.5, 1.0, 2.0)),  # FPN P2
    ],
)
def test_generate_anchors_matches_torchvision(torch, image_hw, feature_hw, sizes, ratios):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    gen = AnchorGenerator(sizes=(tuple(sizes),), aspect_ratios=(tuple(ratios),))
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    feats = [torch.zeros(1, 1, *feature_hw)]
    ref = gen(images, feats)[0].numpy()
    stride = (image_hw[0] // feature_hw[0], image_hw[1] // feature_hw[1])
    got = np.asarray(ops.generate_anchors(feature_hw, stride, sizes, ratios))
    assert got.shape == (feature_hw[0] * feature_hw[1] * len(sizes) * len(ratios), 4)
    np.testing.assert_array_equal(got, ref)


def test_anchor_index_layout_matches_nhwc_head():
    a = np.asarray(ops.generate_anchors((3, 4), 16, (32, 64), (0.5, 1.0, 2.0)))
    per_cell = a.reshape(3, 4, 6, 4)
    centres = (per_cell[..., :2] + per_cell[..., 2:]) / 2
    np.testing.assert_array_equal(centres[2, 1, 0], [16, 32])  # cell (y=2, x=1)
    np.testing.assert_array_equal(per_cell[0, 0], ops.cell_anchors((32, 64), (0.5, 1.0, 2.0)))


def test_generate_anchors_is_static_under_jit():
    f = jax.jit(lambda x: x + ops.generate_anchors((5, 7), 16, (32,), (1.0,)).sum())
    assert float(f(0.0)) == float(ops.generate_anchors((5, 7), 16, (32,), (1.0,)).sum())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(feature_hw=(0, 5), stride=16, sizes=(32,)), "feature_hw"),
        (dict(feature_hw=(5, 5), stride=-1, sizes=(32,)), "stride"),
        (dict(feature_hw=(5, 5), stride=16, sizes=()), "sizes"),
        (dict(feature_hw=(5, 5), stride=16, sizes=(32,), aspect_ratios=(0.0,)), "aspect_ratios"),
    ],
)
def test_generate_anchors_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.generate_anchors(**kwargs)
