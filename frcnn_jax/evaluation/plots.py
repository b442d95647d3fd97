"""Precision-recall plot of a COCO evaluation (matplotlib Agg, no display needed)."""

from __future__ import annotations

import os

import numpy as np


def mean_precision_curves(result) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Class-averaged precision-recall curves (area "all", maxDets 100).

    Args:
      result: a `CocoEvalResult` (precision [T, R, K, A, M], iou_thresholds [T],
        recall_thresholds [R], stats).
    Returns:
      {label: (recall [R] float64, precision [R] float64, AP float)} for "IoU=0.50",
      "IoU=0.75" and "IoU=0.50:0.95" (precision averaged over the IoU thresholds
      too). Classes without GT (precision -1) are left out; a curve is empty ([0]
      arrays) when no class has GT. Each curve's mean is the corresponding AP stat.
    """
    p = result.precision[:, :, :, 0, -1]  # [T, R, K]
    has_gt = (p > -1).all(axis=(0, 1))  # a class either has GT (all >= 0) or is all -1
    p = p[:, :, has_gt]
    rec = np.asarray(result.recall_thresholds, np.float64)
    curves = {}
    for label, key, t in (("IoU=0.50", "AP50", 0.5), ("IoU=0.75", "AP75", 0.75), ("IoU=0.50:0.95", "AP", None)):
        if p.shape[2] == 0:
            curves[label] = (np.zeros(0), np.zeros(0), result.stats[key])
            continue
        sel = p if t is None else p[np.isclose(result.iou_thresholds, t)]
        curves[label] = (rec, sel.mean(axis=(0, 2)), result.stats[key])
    return curves


def plot_precision_recall(result, path) -> None:
    """Writes a PNG of the class-averaged precision-recall curves at IoU 0.5, 0.75 and [.5:.95].

    Args:
      result: a `CocoEvalResult` from `evaluate_coco`.
      path: output .png path (its directory must exist).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    curves = mean_precision_curves(result)
    for label, (rec, prec, ap) in curves.items():
        ax.plot(rec, prec, label=f"{label} (AP {ap:.3f})", linewidth=1.5)
    if all(len(rec) == 0 for rec, _, _ in curves.values()):
        ax.text(0.5, 0.5, "no ground-truth boxes", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (mean over classes)")
    num_with_gt = int(np.sum(result.precision[0, 0, :, 0, -1] > -1))
    ax.set_title(f"COCO box precision-recall (area all, maxDets 100, {num_with_gt} classes with GT)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
