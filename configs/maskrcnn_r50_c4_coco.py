"""maskrcnn-benchmark's R-50-C4 Mask R-CNN, COCO 1x schedule, from COCO JSON (polygons / RLE).

Model: `r50_c4` (configs/r50_c4_coco.py) plus maskrcnn-benchmark's mask branch: the
positive ROIs' res5 output of the box head (shared parameters, SHARE_BOX_FEATURE_EXTRACTOR),
ConvTranspose 2x2 2048 -> 256 + ReLU, 1x1 -> 81 logits: 14x14 masks; 81 classes. Training
targets: each ground truth's mask cropped on the host at 112x112 (`data.mask_size`).
Solver: e2e_mask_rcnn_R_50_C4_1x, the same as configs/r50_c4_coco.py's (this config starts
from it): SGD momentum 0.9, weight decay 1e-4, LR 0.01 at 8 images per batch, warm-up from
1/3 over 500 iterations, x0.1 at 120k and 160k, 180k iterations; biases at 2x LR without
decay. Published (maskrcnn-benchmark MODEL_ZOO): 35.6 box AP, 31.5 mask AP. tfds coco/2017 carries no masks: point
data.coco_json at the COCO download (--config.data.coco_json.*).
"""

from configs import common, r50_c4_coco
from frcnn_jax.modeling import config as model_config


def get_config():
    config = r50_c4_coco.get_config()  # the solver and schedule
    config.model = common.model_section(model_config.maskrcnn_r50_c4(num_classes=81))
    common.coco2017_json(config)
    config.data.update(masks=True, mask_size=112)
    return config
