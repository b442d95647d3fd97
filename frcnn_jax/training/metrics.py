"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events, a progress bar, a loss plot."""

from __future__ import annotations

import json
import pathlib
import sys

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"
SHOWN = ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "lr")


class Progress:
    """tqdm bar: step / total, ETA, images/s and the latest losses and learning rate."""

    def __init__(self, start: int, total: int, batch_size: int | None = None):
        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        self.step = start

    def update(self, step: int, metrics: dict):
        self.bar.update(step - self.step)
        self.step = step
        short = {"loss": "loss", "loss_objectness": "obj", "loss_rpn_box_reg": "rpn_box", "loss_classifier": "cls", "loss_box_reg": "box"}
        post = {v: f"{metrics[k]:.3f}" for k, v in short.items() if k in metrics}
        if "lr" in metrics:
            post["lr"] = f"{metrics['lr']:.2e}"
        if "images_per_sec" in metrics:
            post["img/s"] = f"{metrics['images_per_sec']:.1f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self):
        self.bar.close()


class MetricsWriter:
    """Appends {"step", ...} lines to metrics.jsonl and scalars to TensorBoard (tensorboardX)."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._tb = None

    @property
    def tb(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / TB_DIR))
        return self._tb

    def progress(self, start: int, total: int) -> Progress:
        return Progress(start, total)

    def write(self, step: int, metrics: dict):
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


def plot_losses(history: list[dict], path):
    """loss_curve.png: total and the four named losses against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted({r["step"]: r for r in history}.values(), key=lambda r: r["step"])
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in ("loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"):
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
    plt.close(fig)
