"""The main job: a small R-18-FPN trained from scratch on the built-in shapes dataset.

Runs on a 2-core CPU in well under 10 minutes (setup included) and reaches box
AP@[.5:.95] >= 0.5 on the held-out split. `python train.py --workdir DIR` uses it.
"""

from configs import common


def get_config():
    config = common.base_config()
    model = config.model
    model.update(arch="fpn", num_classes=6)  # background + the shapes dataset's 5 classes
    model.backbone.update(
        depth=18,
        width=16,
        freeze_at=0,  # trained from scratch: nothing frozen
        zero_init_residual=True,
        fpn_channels=64,
    )
    model.anchors.sizes = (16.0, 32.0, 64.0, 128.0, 256.0)
    model.rpn.train.update(pre_nms_top_n=600, post_nms_top_n=128)
    model.rpn.test.update(pre_nms_top_n=300, post_nms_top_n=64)
    model.rpn.assigner.batch_size_per_image = 128
    model.roi_heads.pooler.update(resolution=7, sampling_ratio=2)
    model.roi_heads.representation_size = 128
    model.roi_heads.assigner.batch_size_per_image = 64
    model.roi_heads.postprocess.detections_per_img = 20
    config.data.update(
        source="shapes",
        min_size=(128,),
        test_min_size=128,
        max_size=128,
        canvases=((128, 128),),
        max_gt=8,
        batch_size=8,
        eval_batch_size=8,
    )
    config.data.shapes.update(image_size=128, num_val=200)
    config.optim.update(base_lr=0.02, warmup_steps=100, schedule="step", decay_steps=(1400,))
    config.train.update(num_steps=1800, log_every=20, checkpoint_every=300, eval_every=0, visualize=8)
    return config
