r"""Evaluate detections with the official COCO metrics (pycocotools COCOeval, "bbox").

Evaluate an existing COCO results file against COCO-format ground truth, no model:

  python eval.py --annotations=instances_val2017.json --detections=results.json --out=DIR

Prints pycocotools' standard 12-line summary and a per-class AP table, and writes
  DIR/metrics.json            AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs,
                              ARm, ARl (full precision) and per_class {name: AP or null}
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

FLAGS = flags.FLAGS

flags.DEFINE_string("annotations", None, "COCO-format ground-truth JSON (e.g. instances_val2017.json).")
flags.DEFINE_string(
    "detections", None, 'COCO results JSON: a list of {"image_id", "category_id", "bbox": [x, y, w, h], "score"}.'
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
    print(
        f"Evaluated {len(result.detections)} detections on {result.num_images} images, "
        f"{len(result.category_ids)} categories (COCOeval bbox):"
    )
    print(result.summary, end="")
    print()
    print("Per-class AP@[.5:.95] (area all, maxDets 100; '-' = no ground truth):")
    print(evaluation.format_per_class_table(result.per_class))
    try:
        paths = evaluation.write_coco_report(out, result)
    except OSError as e:
        return _fail(f"cannot write to output directory '{out}': {e.strerror or e}")
    print()
    for path in paths.values():
        print(f"wrote {path}")
    return 0


def main(argv) -> int:
    # One mode for now (a results file, no model); further modes dispatch on their flags here.
    if len(argv) > 1:
        return _fail(f"unexpected arguments {argv[1:]} (use --flag=value; see --help)", 2)
    missing = [f"--{name}" for name in ("annotations", "detections", "out") if not FLAGS[name].value]
    if missing:
        return _fail(f"missing {', '.join(missing)} (see --help)", 2)
    return evaluate_results_file(FLAGS.annotations, FLAGS.detections, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
