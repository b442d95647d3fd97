"""A small R-18-C4 (the slides' C4 layout: trunk to layer3, layer4 box head) on shapes, for CPU.

Same dataset and schedule as configs/default.py; slower per step than the FPN default
because the layer4 head runs on every sampled ROI.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(
        arch="c4",
        anchor_sizes=(16.0, 32.0, 64.0),
        pooler_resolution=8,
        pooler_sampling_ratio=0,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=128,
        box_batch_size_per_image=32,
    )
    return config
