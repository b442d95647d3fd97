"""A small R-18-C4 (the slides' C4 layout: trunk to layer3, layer4 box head) on shapes, for CPU.

Same dataset and schedule as configs/default.py; slower per step than the FPN default
because the layer4 head runs on every sampled ROI.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.arch = "c4"
    config.model.anchors.sizes = (16.0, 32.0, 64.0)
    config.model.rpn.train.update(pre_nms_top_n=600, post_nms_top_n=128)
    config.model.roi_heads.pooler.update(resolution=8, sampling_ratio=0)
    config.model.roi_heads.assigner.batch_size_per_image = 32
    return config
