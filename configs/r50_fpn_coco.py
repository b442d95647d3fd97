"""torchvision's fasterrcnn_resnet50_fpn (v1) recipe on COCO 2017 (tfds coco/2017).

Model as torchvision builds it: ResNet-50 + FPN (P2-P6, 256 channels), one anchor size
per level, per-level pre-NMS top-k 2000/1000, post-NMS 2000/1000, MultiScaleRoIAlign 7x7
sampling 2, two-MLP head 1024, 81 classes (80 COCO categories + background). Solver: the
maskrcnn-benchmark R-50-FPN 1x schedule (SGD 0.02 at 16 images/batch, 90k iterations,
x0.1 at 60k and 80k), which torchvision's reference script follows (26 epochs there).
Initialise the backbone from a converted ImageNet ResNet-50:
    python -m frcnn_jax.convert --arch resnet50 --checkpoint resnet50-0676ba61.pth --out ckpt/r50
    python train.py --config=configs/r50_fpn_coco.py --workdir=... --config.train.init_backbone=ckpt/r50
"""

from configs import common
from frcnn_jax.modeling import config as model_config


def get_config():
    config = common.base_config()
    config.model = common.model_section(model_config.r50_fpn(num_classes=81))
    config.data.source = "tfds"
    config.data.tfds.update(name="coco/2017", train_split="train", val_split="validation")
    config.data.batch_size = 16
    config.optim.update(base_lr=0.02, warmup_steps=500, decay_steps=(60_000, 80_000))
    config.train.update(num_steps=90_000, checkpoint_every=5000, eval_every=10_000)
    return config
