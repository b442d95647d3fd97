r"""Evaluate detections with the official COCO metrics (pycocotools COCOeval, "bbox" and "segm").

Run a model over a dataset split and evaluate it:

  python eval.py --config=configs/x.py --checkpoint=DIR --out=OUT [--split=val] [--max_images=N]
  python eval.py --checkpoint=WORKDIR --out=OUT        # a training run: its own config

DIR is a model checkpoint (`python -m frcnn_jax.convert`) or a training work directory.
The model (architecture, weights, post-process) is the checkpoint's; --score_thresh,
--nms_thresh and --detections_per_img (or --config.model.roi_heads.postprocess.<field>
with --config) replace its `roi_heads.postprocess` values in the compiled model, e.g.
--score_thresh=0.0 keeps boxes the trained default 0.05 drops. Other --config.model.*
overrides are refused in this mode. --print_config prints the resolved config (the
--config file with its overrides, else the work directory's config.json) and exits.
Inference is batched and jitted (config.data.eval_batch_size, one compile per canvas)
with a progress bar. VOC datasets additionally report VOC mAP (2007 11-point and
area-under-curve, both labelled) in OUT/voc_metrics.json. A Mask R-CNN checkpoint is
evaluated on bbox and segm: its masks are pasted into the original images and
RLE-encoded one at a time into the results' "segmentation"; the built-in sources
(shapes, coco_json) are read with data.masks on for the segm ground truth (a ground
truth without segmentations gives bbox only).

Evaluate an existing COCO results file against COCO-format ground truth, no model:

  python eval.py --annotations=instances_val2017.json --detections=results.json --out=DIR

Results that carry "segmentation" (COCO compressed RLE at the original image size, as
pycocotools.mask.encode writes it, counts as a string) are also evaluated as instance
masks (COCOeval "segm", the results' boxes left out so areas come from the masks);
results with "segmentation" but no "bbox" get their mask's extent as box for the bbox
numbers. Ground-truth masks may be polygons, uncompressed or compressed RLE.

Both modes print pycocotools' standard 12-line summary (and the segm one) and a
per-class AP table (box and mask AP), and write
  DIR/metrics.json            AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs,
                              ARm, ARl (full precision, bbox) and per_class {name: AP or
                              null}; with masks also "segm": {the same 12 keys, per_class}
  DIR/detections.json         the evaluated COCO results list
  DIR/precision_recall.png    class-averaged precision-recall curves (IoU .5, .75, .5:.95)

Every ground-truth image is evaluated (images without detections count as misses).
Exit status: 0 on success; non-zero on error, with a one-line "error: ..." on stderr
naming the file and the problem for bad input (1) or the missing flags (2).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if __name__ == "__main__":  # a typo'd --config.<field> is one line (exit 2), before ml_collections parses it
    from frcnn_jax import config_cli

    config_cli.exit_on_unknown_override(sys.argv, default_config=None)
    _overrides = [a.split("=", 1)[0] for a in sys.argv if a.startswith(f"--{config_cli.FLAG}.")]
    if _overrides and config_cli.config_spec(sys.argv, None) is None:  # absl would end with "FATAL ..."
        print(f"error: {_overrides[0]}: a --config.* override needs --config=FILE (for a work directory's own "
              "config, use --score_thresh, --nms_thresh, --detections_per_img)", file=sys.stderr)  # fmt: skip
        sys.exit(2)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Model mode: config file (configs/*.py) describing the dataset.", lock_config=True
)
flags.DEFINE_string("checkpoint", None, "Model mode: model checkpoint directory or training work directory.")
flags.DEFINE_enum("split", "val", ["train", "val"], "Model mode: dataset split to evaluate.")
flags.DEFINE_integer("max_images", 0, "Model mode: evaluate only the first N images (0: all).")
flags.DEFINE_float("score_thresh", None, "Model mode: keep detections scoring above this (default: the checkpoint's).")
flags.DEFINE_float("nms_thresh", None, "Model mode: IoU of the per-class NMS (default: the checkpoint's).")
flags.DEFINE_integer(
    "detections_per_img", None, "Model mode: at most this many detections per image (default: the checkpoint's)."
)
flags.DEFINE_bool("print_config", False, "Print the resolved config (YAML-like, as ml_collections prints it) and exit.")

flags.DEFINE_string("annotations", None, "COCO-format ground-truth JSON (e.g. instances_val2017.json).")
flags.DEFINE_string(
    "detections",
    None,
    'COCO results JSON: a list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"} '
    '(and/or "segmentation": compressed RLE, for mask AP).',
)
flags.DEFINE_string("out", None, "Output directory for metrics.json, detections.json, precision_recall.png (created).")


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def evaluate_results_file(annotations: str, detections: str, out: str) -> int:
    """The model-free mode: evaluate a COCO results file, print the tables, write the outputs."""
    from frcnn_jax import evaluation

    if os.path.exists(out) and not os.path.isdir(out):
        return _fail(f"output directory '{out}' exists and is not a directory")
    try:
        result = evaluation.evaluate_coco(annotations, detections)
    except evaluation.EvaluationInputError as e:
        return _fail(str(e))
    kinds = "bbox" if result.segm is None else "bbox and segm"
    print(
        f"Evaluated {len(result.detections)} detections on {result.num_images} images, "
        f"{len(result.category_ids)} categories (COCOeval {kinds}):"
    )
    return _print_and_write(result, out)


def _print_and_write(result, out: str) -> int:
    from frcnn_jax import evaluation

    print(result.summary, end="")
    segm = result.segm
    if segm is not None:
        print("\nsegm (instance masks):")
        print(segm.summary, end="")
    print()
    print("Per-class AP@[.5:.95] (area all, maxDets 100; '-' = no ground truth):")
    if segm is None:
        print(evaluation.format_per_class_table(result.per_class))
    else:
        print(evaluation.format_per_class_table(result.per_class, columns=2, segm=segm.per_class))
    try:
        paths = evaluation.write_coco_report(out, result)
    except OSError as e:
        return _fail(f"cannot write to output directory '{out}': {e.strerror or e}")
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


POSTPROCESS_FIELDS = ("score_thresh", "nms_thresh", "detections_per_img")
_POSTPROCESS_PREFIX = "--config.model.roi_heads.postprocess."


def postprocess_from_argv(argv, config, flag_values: dict) -> dict:
    """The post-process settings of the command line: {field: value} (fields not given are absent).

    `--config.model.roi_heads.postprocess.<field>` overrides in argv take their (parsed)
    value from `config`; the plain flags (`flag_values`, None when not given) win over
    them. Raises ValueError for another `--config.model.*` override (the model comes
    from the checkpoint) or a bad value.
    """
    out = {}
    for arg in argv:
        if not arg.startswith("--config.model."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0]
        if not arg.startswith(_POSTPROCESS_PREFIX):
            raise ValueError(
                f"--config.{path}: the model comes from --checkpoint; only --config.model.roi_heads.postprocess.* "
                "(or --score_thresh, --nms_thresh, --detections_per_img) apply in this mode"
            )
        field = path.rsplit(".", 1)[-1]
        out[field] = config.model.roi_heads.postprocess[field]
    out.update({k: v for k, v in flag_values.items() if v is not None})
    return out


def _source_has_masks(data) -> bool:
    """Whether a built-in source (shapes, coco_json) can carry instance masks; False otherwise."""
    from frcnn_jax.data import builder

    return data.source in builder.SOURCES and bool(builder._source_class(data.source).has_masks)


def evaluate_checkpoint(
    config, checkpoint: str, split: str, out: str, max_images: int, postprocess: dict | None = None
) -> int:
    """The model mode: batched jitted inference over `split`, COCO (and VOC) metrics.

    postprocess: {field: value} of `roi_heads.postprocess` (score_thresh, nms_thresh,
    detections_per_img, min_size) replacing the checkpoint model's values (missing ones
    are kept; a bad value is one error line naming the field).
    """
    import ml_collections

    from frcnn_jax import model_checkpoint, run_checkpoint
    from frcnn_jax.data import builder
    from frcnn_jax.evaluation import report
    from frcnn_jax.evaluation.model_eval import evaluate_model
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN

    if os.path.exists(out) and not os.path.isdir(out):
        return _fail(f"output directory '{out}' exists and is not a directory")
    try:
        model_cfg, variables, meta = model_checkpoint.load_model(checkpoint)
        if model_cfg is None:
            return _fail(f"{checkpoint} holds a backbone only ({meta.get('kind')}), not a detector")
        model_cfg = model_cfg.updated({f"roi_heads.postprocess.{k}": v for k, v in (postprocess or {}).items()})
        if config is None:
            config = ml_collections.ConfigDict(run_checkpoint.read_config(checkpoint))
        builder.validate_data_config(config.data)
        if model_cfg.mask.enabled and not config.data.get("masks", False) and _source_has_masks(config.data):
            with config.unlocked():  # segm ground truth (shapes draws it only with masks)
                config.data.masks = True
        source = builder.build_source(config.data, split)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e))
    known = set(source.label_to_category_id.values())
    mapping = meta.get("label_to_category_id")
    if mapping is None:
        if model_cfg.num_classes != source.num_object_classes + 1:
            return _fail(
                f"{checkpoint}: the model has {model_cfg.num_classes} classes (with background), the {split} data "
                f"{source.num_object_classes} (+1), and the checkpoint has no label_to_category_id to match them"
            )
        mapping = source.label_to_category_id
    else:  # e.g. torchvision's 91-class COCO head: labels are COCO ids, some unused here
        mapping = {int(k): int(v) for k, v in mapping.items() if int(v) in known}
        if not mapping:
            return _fail(f"{checkpoint}: none of the model's category ids are among the {split} data's categories")
    is_voc = getattr(source, "kind", None) == "voc"
    print(f"Evaluating {checkpoint} on {config.data.source} {split} ({len(source)} images"
          f"{f', first {max_images}' if max_images else ''}), {model_cfg.arch} model, {model_cfg.num_classes} classes")  # fmt: skip
    post = model_cfg.roi_heads.postprocess
    print(f"Post-process: score_thresh {post.score_thresh}, nms_thresh {post.nms_thresh}, "
          f"detections_per_img {post.detections_per_img}")  # fmt: skip
    out_eval = evaluate_model(
        FasterRCNN(model_cfg),
        variables,
        source,
        config,
        label_to_category_id=mapping,
        max_images=max_images,
        voc=is_voc,
    )
    result, voc = out_eval if is_voc else (out_eval, None)
    code = _print_and_write(result, out)
    if voc is not None:
        print(f"VOC mAP@0.5: 2007 11-point {voc['mAP_07_11point']:.4f}, area under PR curve {voc['mAP_area']:.4f}")
        report.write_json(os.path.join(out, "voc_metrics.json"), voc)
    return code


def print_config(config, checkpoint: str | None) -> int:
    """--print_config: the --config file with its overrides, else the work directory's config.json."""
    if config is None:
        if not checkpoint:
            return _fail("--print_config needs --config or --checkpoint=WORKDIR (a training run)", 2)
        import ml_collections

        from frcnn_jax import run_checkpoint

        try:
            config = ml_collections.ConfigDict(run_checkpoint.read_config(checkpoint))
        except (FileNotFoundError, ValueError) as e:
            return _fail(str(e))
    print(config, end="")
    return 0


def main(argv) -> int:
    if len(argv) > 1:
        return _fail(f"unexpected arguments {argv[1:]} (use --flag=value; see --help)", 2)
    if FLAGS.print_config:
        return print_config(FLAGS.config, FLAGS.checkpoint)
    if not FLAGS.out:
        return _fail("missing --out (see --help)", 2)
    if FLAGS.checkpoint:
        from frcnn_jax import compilation_cache

        compilation_cache.enable()
        if FLAGS.annotations or FLAGS.detections:
            return _fail("--checkpoint (model mode) cannot be combined with --annotations/--detections", 2)
        try:
            postprocess = postprocess_from_argv(
                sys.argv, FLAGS.config, {name: FLAGS[name].value for name in POSTPROCESS_FIELDS}
            )
        except ValueError as e:
            return _fail(str(e), 2)
        return evaluate_checkpoint(
            FLAGS.config, FLAGS.checkpoint, FLAGS.split, FLAGS.out, FLAGS.max_images, postprocess
        )
    missing = [f"--{name}" for name in ("annotations", "detections") if not FLAGS[name].value]
    if missing:
        return _fail(f"missing {', '.join(missing)}, or --checkpoint for the model mode (see --help)", 2)
    return evaluate_results_file(FLAGS.annotations, FLAGS.detections, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
