"""The slides' model: maskrcnn-benchmark R-50-C4 Faster R-CNN, COCO 1x schedule (tfds coco/2017).

ResNet-50 to layer3 (stride 16, 1024 channels), 15 anchors (sizes 32-512, ratios 0.5/1/2),
RPN pre-NMS top-k 12000/6000, post-NMS 2000/1000, ROIAlign 14x14 (adaptive sampling),
layer4 + average pool box head, 81 classes. Solver: maskrcnn-benchmark
e2e_faster_rcnn_R_50_C4_1x: SGD momentum 0.9, weight decay 1e-4, LR 0.01 at 8 images per
batch, warm-up from 1/3 over 500 iterations, x0.1 at 120k and 160k, 180k iterations;
biases at 2x LR without decay (BIAS_LR_FACTOR 2). Reference: 34.8 box AP
(maskrcnn-benchmark, Caffe2 ImageNet weights, 8 V100s).
"""

from configs import common
from frcnn_jax.modeling import config as model_config


def get_config():
    config = common.base_config()
    config.model = common.model_section(model_config.r50_c4(num_classes=81))  # the ModelConfig defaults
    config.data.source = "tfds"
    config.data.tfds.update(name="coco/2017", train_split="train", val_split="validation")
    config.data.batch_size = 8
    config.optim.update(
        base_lr=0.01, bias_lr_factor=2.0, weight_decay=1e-4, warmup_steps=500, warmup_factor=1.0 / 3,
        decay_steps=(120_000, 160_000),
    )  # fmt: skip
    config.train.update(num_steps=180_000, checkpoint_every=5000, eval_every=20_000)
    return config
