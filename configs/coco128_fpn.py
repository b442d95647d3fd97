"""R-50-FPN (torchvision v1 recipe) on the 128-image coco128 excerpt, as a COCO-JSON dataset.

Points at ../shared/data/coco128 (COCO train2017 photos with their original
annotations); the same images serve as train and val split. Used to evaluate converted
torchvision checkpoints end to end (`eval.py --config=configs/coco128_fpn.py
--checkpoint=DIR`) and as a CPU smoke test of training on real photos. Override the
paths with --config.data.coco_json.*.
"""

from configs import r50_fpn_coco


def get_config():
    config = r50_fpn_coco.get_config()
    root = "../shared/data/coco128"
    config.data.source = "coco_json"
    config.data.coco_json.update(
        train_annotations=f"{root}/annotations.json",
        train_images=f"{root}/images",
        val_annotations=f"{root}/annotations.json",
        val_images=f"{root}/images",
    )
    # Two canvases (landscape, portrait) keep it to two compiled shapes on CPU.
    config.data.canvases = ((800, 1344), (1344, 800))
    config.data.batch_size = 2
    config.data.eval_batch_size = 2
    config.optim.update(base_lr=0.0025, warmup_steps=50, decay_steps=(300,))
    config.train.update(num_steps=400, checkpoint_every=100, log_every=10)
    # R-50 at 800x1344 on the CPU: XLA's memory-optimised schedule halves the step's peak
    # (7.6 -> 4.4 GB at batch 2) for ~4 % more time (README, "training-step memory").
    config.train.xla_cpu_scheduler = "memory"
    return config
