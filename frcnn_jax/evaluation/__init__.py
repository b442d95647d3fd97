"""Detection evaluation: COCO (pycocotools) and Pascal VOC AP, PR plots and report files.

Pure numpy / pycocotools / matplotlib; importing it does not import JAX.
"""

from frcnn_jax.evaluation.coco import (
    STAT_KEYS,
    CocoEvalResult,
    EvaluationInputError,
    check_coco_gt,
    check_coco_gt_segmentation,
    check_coco_results,
    contiguous_label_map,
    evaluate_coco,
    load_coco_gt,
    load_json,
    per_class_ap,
    to_coco_results,
    to_coco_results_with_masks,
)
from frcnn_jax.evaluation.plots import mean_precision_curves, plot_precision_recall
from frcnn_jax.evaluation.report import (
    COCO_METRICS_FILE,
    DETECTIONS_FILE,
    PR_PLOT_FILE,
    format_per_class_table,
    write_coco_report,
    write_detections_json,
    write_json,
    write_metrics_json,
)
from frcnn_jax.evaluation.voc import evaluate_voc, match_detections, voc_ap

__all__ = [
    "STAT_KEYS",
    "CocoEvalResult",
    "EvaluationInputError",
    "check_coco_gt",
    "check_coco_gt_segmentation",
    "check_coco_results",
    "contiguous_label_map",
    "evaluate_coco",
    "load_coco_gt",
    "load_json",
    "per_class_ap",
    "to_coco_results",
    "to_coco_results_with_masks",
    "mean_precision_curves",
    "plot_precision_recall",
    "DETECTIONS_FILE",
    "COCO_METRICS_FILE",
    "PR_PLOT_FILE",
    "format_per_class_table",
    "write_coco_report",
    "write_detections_json",
    "write_json",
    "write_metrics_json",
    "evaluate_voc",
    "match_detections",
    "voc_ap",
]
