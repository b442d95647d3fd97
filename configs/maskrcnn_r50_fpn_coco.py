"""torchvision's maskrcnn_resnet50_fpn (v1) recipe on COCO 2017, from COCO JSON (polygons / RLE).

Model: `r50_fpn` plus torchvision's mask branch (MultiScaleRoIAlign 14x14 sampling 2 on
P2-P5, 4 x conv 3x3 256 + ReLU, ConvTranspose 2x2 256, 1x1 -> 81 logits: 28x28 masks),
81 classes (80 COCO categories + background). Training targets: each ground truth's mask
cropped on the host at 112x112 (`data.mask_size`; README, "Data"). Solver: torchvision's
reference script (references/detection, `--epochs 26 --lr-steps 16 22 --aspect-ratio-group-factor 3`):
SGD momentum 0.9, weight decay 1e-4, LR 0.02 at 16 images per batch, linear warm-up from
1/1000 over 1000 iterations, x0.1 at epochs 16 and 22, 26 epochs. An epoch is
ceil(117266 / 16) = 7330 steps (train2017 less its images without annotations, as
torchvision drops them): steps 117,280 and 161,260, 190,580 in all. Published: 37.9 box
AP, 34.6 mask AP (torchvision's model card). tfds coco/2017 carries no masks: point
data.coco_json at the COCO download (--config.data.coco_json.*):
    python train.py --config=configs/maskrcnn_r50_fpn_coco.py --workdir=... \\
        --config.train.init_backbone=ckpt/r50 --config.data.coco_json.train_images=/data/coco/train2017 ...
"""

from configs import common
from frcnn_jax.modeling import config as model_config

EPOCH = 7330  # steps per epoch at 16 images: ceil(117266 / 16)


def get_config():
    config = common.base_config()
    config.model = common.model_section(model_config.maskrcnn_r50_fpn(num_classes=81))
    common.coco2017_json(config)
    config.data.update(masks=True, mask_size=112, batch_size=16)
    config.optim.update(
        base_lr=0.02, weight_decay=1e-4, warmup_steps=1000, warmup_factor=1.0 / 1000,
        decay_steps=(16 * EPOCH, 22 * EPOCH),
    )  # fmt: skip
    config.train.update(num_steps=26 * EPOCH, checkpoint_every=5000, eval_every=2 * EPOCH)
    return config
