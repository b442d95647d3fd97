"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events, a progress bar, a loss plot.

In a multi-process run only process 0 writes (`enabled=False` elsewhere): every row of
metrics.jsonl and every TensorBoard scalar appears once.
"""

from __future__ import annotations

import json
import pathlib
import sys

from tqdm import tqdm

from frcnn_jax.io_utils import write_atomic
from frcnn_jax.modeling.faster_rcnn import ALL_LOSS_NAMES

TRAIN_METRICS_FILE = "metrics.jsonl"  # one JSON row per logged step (eval.py's COCO metrics: COCO_METRICS_FILE)
TB_DIR = "tensorboard"


class Progress:
    """tqdm bar: step / total, ETA, images/s and the latest logged losses and learning rate.

    `advance(step)` costs no device sync (the loop calls it every step); `show(metrics)`
    updates the figures at log steps. Disabled, it prints nothing.
    """

    def __init__(self, start: int, total: int, enabled: bool = True):
        self.bar = tqdm(
            total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr,
            mininterval=1.0, disable=not enabled,
        )  # fmt: skip
        self.step = start

    def advance(self, step: int):
        self.bar.update(step - self.step)
        self.step = step

    def show(self, metrics: dict):
        short = dict(zip(("loss", *ALL_LOSS_NAMES), ("loss", "obj", "rpn_box", "cls", "box", "mask"), strict=True))
        post = {v: f"{metrics[k]:.3f}" for k, v in short.items() if k in metrics}
        if "lr" in metrics:
            post["lr"] = f"{metrics['lr']:.2e}"
        if "images_per_sec" in metrics:
            post["img/s"] = f"{metrics['images_per_sec']:.1f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self):
        self.bar.close()


class MetricsWriter:
    """Appends {"step", ...} lines to metrics.jsonl and scalars to TensorBoard (tensorboardX).

    resumed_from: the step the run (re)starts from: its restored checkpoint's, or 0 for a
    run without one (which may follow a run killed before its first checkpoint). Rows an
    interrupted run logged after that step are dropped from metrics.jsonl (the resumed run
    logs them again, with the same values) and TensorBoard is told to purge its events
    after that step, so each step appears once. enabled=False: writes nothing (processes
    other than 0).
    """

    def __init__(self, workdir, *, enabled: bool = True, resumed_from: int | None = None):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / TRAIN_METRICS_FILE
        self.enabled = enabled
        self._purge_step = None if resumed_from is None else resumed_from + 1  # TensorBoard drops steps >= this
        self._tb = None
        if enabled and resumed_from is not None:
            self._truncate_after(resumed_from)

    def _truncate_after(self, step: int):
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if (_row_step(line) or 0) in range(1, step + 1)]
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    @property
    def tb(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / TB_DIR), purge_step=self._purge_step)
        return self._tb

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
        self.tb.flush()

    def read_history(self) -> list[dict]:
        """Earlier lines (a resumed run keeps its whole loss curve)."""
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            if "loss" in row:
                rows.append(row)
        return rows

    def close(self):
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _row_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line cut by an interruption
        return None


def plot_losses(history: list[dict], path):
    """loss_curve.png: the total and each named loss the rows hold (the box model's four, Mask
    R-CNN's loss_mask) against the step (matplotlib's object API)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted({r["step"]: r for r in history}.values(), key=lambda r: r["step"])
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key in ("loss", *ALL_LOSS_NAMES):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, linewidth=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("training losses")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
