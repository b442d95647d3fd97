"""A tiny R-18-FPN on 128 px shapes: the training-loop tests' config (seconds per run on CPU).

Importable (`tiny_config.get_config()`) and usable as a train.py config file:
`python train.py --config=tests/tiny_config.py --workdir=DIR`; `--config=tests/tiny_config.py:mask`
(`get_config("mask")`) is the same model with a tiny Mask R-CNN branch (the resilience tests' model).
"""

from configs import common, default
from frcnn_jax.modeling.config import ModelConfig

# A tiny mask branch: 7x7 pooled -> 1 x conv 3x3 8 -> 14x14 masks, trained on 16x16 host crops.
TINY_MASK = {"enabled": True, "pooler": {"resolution": 7, "sampling_ratio": 2}, "conv_channels": (8,),
             "predictor_channels": 8}  # fmt: skip


def get_config(variant: str = ""):
    if variant not in ("", "mask"):
        raise ValueError(f"tests/tiny_config.py:{variant}: the variants are '' and 'mask'")
    config = default.get_config()
    config.model.backbone.update(width=8, fpn_channels=16)
    config.model.roi_heads.representation_size = 32
    config.model.rpn.train.post_nms_top_n = 32
    config.model.roi_heads.assigner.batch_size_per_image = 16
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.data.shapes.num_val = 8
    config.optim.warmup_steps = 2
    config.optim.decay_steps = (4,)
    config.train.num_steps = 6
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.eval_every = 4
    config.train.visualize = 2
    if variant == "mask":
        config.model = common.model_section(ModelConfig.from_dict({**config.model.to_dict(), "mask": TINY_MASK}))
        config.data.update(masks=True, mask_size=16)
    return config
