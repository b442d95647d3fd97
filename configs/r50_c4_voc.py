"""The slides' VOC model: R-50-C4 with 21 classes and 9 anchors (cls_logits 9, bbox_pred 36).

tfds voc/2007 (trainval -> test), anchor sizes (128, 256, 512) x ratios (0.5, 1, 2),
VOC test-time post-NMS 300 proposals. Solver (maskrcnn-benchmark VOC, 1 image per
batch): LR 0.001, steps at 50k and 70k, 80k iterations. Evaluation reports COCO-style AP
and VOC mAP (2007 11-point and area under the curve).
"""

from configs import common
from frcnn_jax.modeling import config as model_config


def get_config():
    config = common.base_config()
    config.model = common.model_section(model_config.r50_c4(num_classes=21, **{"anchors.sizes": (128.0, 256.0, 512.0)}))
    config.model.rpn.test.post_nms_top_n = 300
    config.data.source = "tfds"
    config.data.tfds.update(name="voc/2007", train_split="train+validation", val_split="test")
    config.data.min_size = (600,)
    config.data.test_min_size = 600
    config.data.max_size = 1000
    config.data.canvases = ((608, 1024), (1024, 608), (608, 800), (800, 608))
    config.data.batch_size = 1
    config.data.max_gt = 64
    config.optim.update(base_lr=0.001, warmup_steps=500, decay_steps=(50_000, 70_000))
    config.train.update(num_steps=80_000, checkpoint_every=5000, eval_every=20_000)
    return config
