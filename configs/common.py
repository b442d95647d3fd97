"""Shared structure of every config: model, data, optim and train sections.

Each config file's `get_config()` starts from `base_config()` and overrides fields.
The model section holds every `frcnn_jax.modeling.config.ModelConfig` field, nested in
its sections (backbone, anchors, rpn, roi_heads; defaults: maskrcnn-benchmark R-50-C4 on
COCO; `model_section(recipe)` starts from another recipe), and optim every `OptimConfig`
field but the step count (`train.num_steps` is the one), so any of them can be overridden
on the command line (`--config.model.rpn.nms_thresh=0.6`) and an unknown field fails at start.
"""

import dataclasses

import ml_collections

from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.training.optim import OptimConfig


def _tuples(tree):
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    return tuple(tree) if isinstance(tree, list) else tree


def model_section(model: ModelConfig) -> ml_collections.ConfigDict:
    """`config.model` for a `ModelConfig` (e.g. a recipe: `frcnn_jax.modeling.config.r50_fpn()`)."""
    return ml_collections.ConfigDict(_tuples(model.to_dict()))


def optim_section() -> ml_collections.ConfigDict:
    """`config.optim`: the `OptimConfig` defaults, without `total_steps` (set from `train.num_steps`)."""
    fields = {f.name: f.default for f in dataclasses.fields(OptimConfig) if f.name != "total_steps"}
    return ml_collections.ConfigDict(_tuples(fields))


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = model_section(ModelConfig())

    config.data = ml_collections.ConfigDict()
    config.data.source = "shapes"  # "shapes" | "coco_json" | "tfds"
    config.data.min_size = (800,)  # short side; several values = multi-scale training (one per image)
    config.data.test_min_size = 800
    config.data.max_size = 1333
    # Static padded canvases (H, W), multiples of 32; each image uses the smallest that holds it.
    config.data.canvases = ((800, 1088), (1088, 800), (800, 1344), (1344, 800))
    config.data.max_gt = 100  # ground-truth boxes per image (padded)
    config.data.batch_size = 16  # global batch (all devices, all hosts)
    config.data.eval_batch_size = 8
    # grain worker processes: "auto" (0 on CPU, else min(16, cores // 2)) or a number (0: threads
    # of the training process); see frcnn_jax.data.builder.resolve_num_workers.
    config.data.num_workers = "auto"
    config.data.hflip = True
    # Instance masks for Mask R-CNN training (shapes, coco_json; tfds has none): each mask is
    # cropped to its box on the host at mask_size x mask_size (uint8), see frcnn_jax/data/masks.py.
    config.data.masks = False
    config.data.mask_size = 112
    config.data.shapes = ml_collections.ConfigDict(dict(image_size=128, num_train=1_000_000, num_val=500, seed=0))
    config.data.tfds = ml_collections.ConfigDict(
        dict(name="coco/2017", train_split="train", val_split="validation", data_dir="")
    )
    config.data.coco_json = ml_collections.ConfigDict(
        dict(train_annotations="", train_images="", val_annotations="", val_images="")
    )

    config.optim = optim_section()

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 180_000
    config.train.log_every = 20
    config.train.checkpoint_every = 5000
    config.train.keep_checkpoints = 3
    config.train.eval_every = 0  # 0: evaluate only at the end
    config.train.eval_max_images = 0  # 0: the whole validation split
    config.train.init_backbone = ""  # converted ImageNet ResNet (`python -m frcnn_jax.convert --arch resnet50`)
    # Start from a detector's weights (not its step or optimiser state): a converted one
    # (`python -m frcnn_jax.convert --arch fasterrcnn_resnet50_fpn ...` output) or another
    # run's work directory (its latest checkpoint). Arrays whose path and shape match are
    # loaded; with another model.num_classes the class-dependent layers (the box predictor,
    # modeling/param_paths.py CLASS_DEPENDENT) are re-initialised; any other mismatch is an
    # error naming the parameter. Applied at step 0 only: a rerun resumes from the workdir.
    config.train.init_checkpoint = ""
    # Parameters that never train, besides model.backbone.freeze_at: a regular expression
    # re.match-ed against each '/'-joined parameter path ("" = none). "backbone/" trains the
    # RPN and box head only; "backbone/|rpn/" the box head only. Must match some parameter.
    config.train.freeze = ""
    config.train.visualize = 8  # validation images drawn into WORKDIR/detections.png at the end
    config.train.async_checkpoint = True  # orbax writes in the background; the last save is awaited
    config.train.prefetch = 2  # batches placed on the devices ahead of the running step
    # "allow" | "log" | "disallow": jax.transfer_guard_device_to_host between metric fetches
    # ("disallow" turns an accidental per-step host sync into an error).
    config.train.transfer_guard = "allow"
    # XLA:CPU schedule of the step: "default" (concurrency-optimised) or "memory" (lower
    # peak memory, a few % slower; see README "Training step"). Ignored on GPU/TPU.
    config.train.xla_cpu_scheduler = "default"
    # glibc's mmap threshold in MiB, pinned for the training process (0: glibc's own, which
    # rises after the first step, so the step's buffers fragment the heap). 1 keeps the peak
    # steady between runs and lowered the Mask R-CNN R-50-FPN step's by 0.2-0.7 GB, for a
    # few % more time (README "Training step").
    config.train.malloc_mmap_threshold_mb = 0
    return config


def coco2017_json(config: ml_collections.ConfigDict, root: str = "data/coco") -> None:
    """Points `config.data` at a COCO 2017 download (instances JSON: boxes, polygons, crowd RLE).

    root/annotations/instances_{train,val}2017.json and root/{train,val}2017/; each path
    stays overridable (--config.data.coco_json.*).
    """
    config.data.source = "coco_json"
    config.data.coco_json.update(
        train_annotations=f"{root}/annotations/instances_train2017.json",
        train_images=f"{root}/train2017",
        val_annotations=f"{root}/annotations/instances_val2017.json",
        val_images=f"{root}/val2017",
    )
