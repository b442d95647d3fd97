"""A tiny R-18-FPN on 128 px shapes: the training-loop tests' config (seconds per run on CPU).

Importable (`tiny_config.get_config()`) and usable as a train.py config file:
`python train.py --config=tests/tiny_config.py --workdir=DIR`.
"""

from configs import default


def get_config():
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
    return config
