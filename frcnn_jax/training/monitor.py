"""Device-side training metrics: summed over a log window, fetched every `log_every` steps.

    monitor = init_monitor(metric_names)                # pytree of arrays (replicated)
    monitor = accumulate(monitor, metrics, step)        # inside the jitted step, no host sync
    means, count = window_means(host_monitor)           # at a log step, after one device_get
    monitor = reset_window(monitor)

What is logged at a log step is the mean of each metric over the steps since the previous
log step (the window), so `loss` in metrics.jsonl is the average training loss of those
steps; with `log_every = 1` it is each step's value.

Divergence: the monitor also keeps, on the device, the first step whose loss terms or
gradient norm were not finite (`first_bad_step`, -1 while all are finite), which of the
`checked_names` terms were bad then and their values. The loop fetches that record (a few
bytes) before each checkpoint and at each log or eval step, so training stops before any
checkpoint holding non-finite parameters is written, and the error names the first bad
step and term.

The monitor is saved in the run's checkpoint, so a resumed run logs exactly the windows
an uninterrupted one would, whatever `checkpoint_every` and `log_every` are.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from frcnn_jax.modeling.faster_rcnn import ALL_LOSS_NAMES


def checked_names(metric_names) -> tuple[str, ...]:
    """The terms the non-finite check watches: the total, each loss among `metric_names`
    (`train_step.metric_names(cfg)`: the model's own, e.g. loss_mask for Mask R-CNN), grad_norm."""
    return ("loss",) + tuple(n for n in ALL_LOSS_NAMES if n in metric_names) + ("grad_norm",)


def init_monitor(metric_names: Sequence[str]) -> dict:
    """Zero sums for `metric_names` (float32 scalars), count 0, no bad step."""
    return {
        "sums": {name: jnp.zeros((), jnp.float32) for name in metric_names},
        "count": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),
        "bad_terms": jnp.zeros((len(checked_names(metric_names)),), bool),
        "bad_values": jnp.zeros((len(checked_names(metric_names)),), jnp.float32),
    }


def accumulate(monitor: dict, metrics: dict, step) -> dict:
    """Adds one step's metrics (float scalars) to the window; records the first non-finite step.

    step: int32 scalar, the 1-based number of the step that produced `metrics`.
    """
    sums = {k: monitor["sums"][k] + metrics[k].astype(jnp.float32) for k in monitor["sums"]}
    values = jnp.stack([metrics[k].astype(jnp.float32) for k in checked_names(monitor["sums"])])
    bad = ~jnp.isfinite(values)
    first = (monitor["first_bad_step"] < 0) & jnp.any(bad)
    return {
        "sums": sums,
        "count": monitor["count"] + 1,
        "first_bad_step": jnp.where(first, step.astype(jnp.int32), monitor["first_bad_step"]),
        "bad_terms": jnp.where(first, bad, monitor["bad_terms"]),
        "bad_values": jnp.where(first, values, monitor["bad_values"]),
    }


def reset_window(monitor: dict) -> dict:
    """The same monitor with the window sums and count zeroed (the divergence record is kept)."""
    return dict(
        monitor,
        sums=jax.tree.map(jnp.zeros_like, monitor["sums"]),
        count=jnp.zeros_like(monitor["count"]),
    )


def window_means(host_monitor: dict) -> dict[str, float]:
    """{metric: mean over the window} from a fetched (numpy) monitor; {} for an empty window."""
    n = int(host_monitor["count"])
    if n == 0:
        return {}
    return {k: float(v) / n for k, v in host_monitor["sums"].items()}


def divergence_message(host_record: dict) -> str | None:
    """None if every step so far was finite, else "non-finite loss at step N: term=value, ..."."""
    step = int(host_record["first_bad_step"])
    if step < 0:
        return None
    terms = np.asarray(host_record["bad_terms"])
    values = np.asarray(host_record["bad_values"])
    bad = ", ".join(f"{name}={values[i]}" for i, name in enumerate(checked_names(host_record["sums"])) if terms[i])
    return f"non-finite loss at step {step}: {bad}"
