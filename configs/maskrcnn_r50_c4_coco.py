"""maskrcnn-benchmark's R-50-C4 Mask R-CNN, COCO 1x schedule, from COCO JSON (polygons / RLE).

Model: `r50_c4` (configs/r50_c4_coco.py) plus maskrcnn-benchmark's mask branch: the
positive ROIs' res5 output of the box head (shared parameters, SHARE_BOX_FEATURE_EXTRACTOR),
ConvTranspose 2x2 2048 -> 256 + ReLU, 1x1 -> 81 logits: 14x14 masks; 81 classes. Training
targets: each ground truth's mask cropped on the host at 112x112 (`data.mask_size`).
Solver: e2e_mask_rcnn_R_50_C4_1x, as configs/r50_c4_coco.py: SGD momentum 0.9, weight
decay 1e-4, LR 0.01 at 8 images per batch, warm-up from 1/3 over 500 iterations, x0.1 at
120k and 160k, 180k iterations; biases at 2x LR without decay. Published (maskrcnn-benchmark
MODEL_ZOO): 35.6 box AP, 31.5 mask AP. tfds coco/2017 carries no masks: point
data.coco_json at the COCO download (--config.data.coco_json.*).
"""

from configs import common
from frcnn_jax.modeling import config as model_config


def get_config():
    config = common.base_config()
    config.model = common.model_section(model_config.maskrcnn_r50_c4(num_classes=81))
    config.data.source = "coco_json"
    root = "data/coco"
    config.data.coco_json.update(
        train_annotations=f"{root}/annotations/instances_train2017.json",
        train_images=f"{root}/train2017",
        val_annotations=f"{root}/annotations/instances_val2017.json",
        val_images=f"{root}/val2017",
    )
    config.data.update(masks=True, mask_size=112, batch_size=8)
    config.optim.update(
        base_lr=0.01, bias_lr_factor=2.0, weight_decay=1e-4, warmup_steps=500, warmup_factor=1.0 / 3,
        decay_steps=(120_000, 160_000),
    )  # fmt: skip
    config.train.update(num_steps=180_000, checkpoint_every=5000, eval_every=20_000)
    return config
