"""`train_and_evaluate(config, workdir)`: the loop behind `python train.py`.

Flax-examples style: build the data, the model and the train state, resume from the
latest checkpoint in `workdir` if there is one, then step, log, checkpoint and
evaluate. Everything that decides numbers lives in the pure functions it calls
(`train_step`, `targets`, the ops); this file only wires them together.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from frcnn_jax import checkpoint as model_checkpoint
from frcnn_jax.data import builder as data_lib
from frcnn_jax.evaluation.coco import evaluate_coco
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
from frcnn_jax.training import checkpointing, sharding
from frcnn_jax.evaluation.model_eval import evaluate_model, predictions_png
from frcnn_jax.training.metrics import MetricsWriter, plot_losses
from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule
from frcnn_jax.training.train_step import LOSS_NAMES, TrainState, create_train_state, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the loss term."""


def validate_config(config: ml_collections.ConfigDict) -> tuple[ModelConfig, OptimConfig]:
    """Checks the whole config up front; raises ValueError naming the bad field."""
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    optim_cfg = OptimConfig.from_dict(config.optim.to_dict())
    t = config.train
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        if int(t[name]) < 1:
            raise ValueError(f"train.{name}={t[name]!r}: must be >= 1")
    for name in ("eval_every", "eval_max_images", "visualize"):
        if int(t[name]) < 0:
            raise ValueError(f"train.{name}={t[name]!r}: must be >= 0")
    data_lib.validate_data_config(config.data)
    return model_cfg, optim_cfg


def _check_resume_compatible(workdir: pathlib.Path, config: ml_collections.ConfigDict):
    """A work directory holds one run: its model must not change between restarts."""
    path = workdir / checkpointing.CONFIG_JSON
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("model", {})
    now = json.loads(json.dumps(config.model.to_dict(), default=list))
    diffs = [f"model.{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different model config; use a new --workdir or the same config "
            f"({'; '.join(diffs[:5])})"
        )


def _init_variables(model: FasterRCNN, config, seed: int, *, load_backbone: bool = True):
    """Random variables, with the trunk (and the C4 head's layer4) from `train.init_backbone` if set.

    The backbone checkpoint is always checked; with load_backbone=False (a resumed run,
    whose checkpoint replaces these values) it is not read.
    """
    path = config.train.init_backbone
    if path:  # check the backbone checkpoint before spending time on the model
        meta = model_checkpoint.read_model_json(path).get("metadata", {})
        if meta.get("kind") != "resnet_backbone":
            raise ValueError(f"train.init_backbone={path!r}: not a ResNet backbone checkpoint (kind {meta.get('kind')!r})")
        if meta.get("depth") != model.cfg.depth or model.cfg.width != 64:
            raise ValueError(
                f"train.init_backbone={path!r}: a ResNet-{meta.get('depth')} checkpoint cannot initialise "
                f"model.depth={model.cfg.depth}, model.width={model.cfg.width}"
            )
    variables = init_variables(model, jax.random.key(seed))
    if not path or not load_backbone:
        return variables
    _, backbone, _ = model_checkpoint.load_model(path)
    params = jax.tree.map(lambda x: x, variables["params"])
    frozen = jax.tree.map(lambda x: x, variables["frozen"])
    body_p, body_f = params["backbone"]["body"], frozen["backbone"]["body"]
    for name in body_p:
        body_p[name] = backbone["params"][name]
        if name in body_f:
            body_f[name] = backbone["frozen"][name]
    if model.cfg.arch == "c4":  # layer4 is the box head
        params["roi_heads"]["box_head"]["layer4"] = backbone["params"]["layer4"]
        frozen["roi_heads"]["box_head"]["layer4"] = backbone["frozen"]["layer4"]
    log.info("initialised the backbone from %s", path)
    return {"params": params, "frozen": frozen}


def _to_host_metrics(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, stop_after_steps: int | None = None) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

    Args:
      config: a config from `configs/` (see configs/common.py for the fields).
      workdir: output directory: checkpoints, metrics.jsonl, TensorBoard events,
        loss_curve.png, eval_final.json, detections.png.
      stop_after_steps: stop (as if interrupted) after this many steps of this call,
        after checkpointing; the next call resumes. None runs to train.num_steps.
    Returns:
      the final evaluation metrics (AP, AP50, ... per_class), or {} if stopped early.
    """
    workdir = pathlib.Path(workdir)
    # Everything is checked before anything is written.
    model_cfg, optim_cfg = validate_config(config)
    train_source = data_lib.build_source(config.data, "train")
    val_source = data_lib.build_source(config.data, "val")
    if train_source.num_classes + 1 != model_cfg.num_classes:
        raise ValueError(
            f"model.num_classes={model_cfg.num_classes} but the {config.data.source} data has "
            f"{train_source.num_classes} classes (+1 background = {train_source.num_classes + 1})"
        )
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.data.batch_size, mesh)
    multi_host = jax.process_count() > 1
    if multi_host and len(config.data.canvases) > 1:
        raise ValueError(
            f"data.canvases={config.data.canvases!r}: multi-host training needs a single canvas (each host "
            "groups its own images by canvas, so hosts could otherwise disagree on a step's shape)"
        )
    put_batch = sharding.process_batch_to_global if multi_host else sharding.put_batch
    _check_resume_compatible(workdir, config)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpointing.write_config(workdir, config.to_dict())

    model = FasterRCNN(model_cfg)
    lr_fn = learning_rate_schedule(optim_cfg)
    mngr = checkpointing.manager(workdir, max_to_keep=config.train.keep_checkpoints)
    variables = _init_variables(model, config, config.seed, load_backbone=mngr.latest_step() is None)
    state, tx = create_train_state(model, variables, optim_cfg, config.seed)
    data_state = None
    meta = {
        "class_names": ["__background__"] + list(train_source.class_names),
        "label_to_category_id": {str(k): int(v) for k, v in train_source.label_to_category_id.items()},
        "min_size": int(config.data.test_min_size),
        "max_size": int(config.data.max_size),
        "canvases": [list(c) for c in config.data.canvases],
    }
    if mngr.latest_step() is not None:
        abstract = jax.eval_shape(lambda: state)
        state, data_state, _ = checkpointing.restore(mngr, abstract)
        state = jax.tree.map(jnp.asarray, state)
        log.info("resumed from step %d", int(state.step))

    train_iter = data_lib.train_iterator(train_source, config.data, seed=config.seed)
    if data_state is not None:
        train_iter.set_state(data_state)

    placed = jax.device_put(state, sharding.replicated(mesh))
    step_fn = sharding.shard_train_step(make_train_step(model, tx, lr_fn), mesh, placed)
    state = placed

    writer = MetricsWriter(workdir)
    start = int(state.step)
    num_steps = int(config.train.num_steps)
    end = num_steps if stop_after_steps is None else min(num_steps, start + stop_after_steps)
    progress = writer.progress(start, num_steps)
    t_last, imgs = time.time(), 0
    history = writer.read_history()
    for step in range(start, end):
        batch = next(train_iter)
        state, metrics = step_fn(state, put_batch(batch, mesh))
        m = _to_host_metrics(metrics)
        bad = [k for k in ("loss",) + LOSS_NAMES if not math.isfinite(m[k])]
        if bad:
            writer.close()
            raise TrainingDiverged(
                f"non-finite loss at step {step + 1}: {', '.join(f'{k}={m[k]}' for k in bad)} "
                f"(last good checkpoint: step {mngr.latest_step()}; it is left intact)"
            )
        imgs += config.data.batch_size
        done = step + 1
        progress.update(done, m)
        if done % config.train.log_every == 0 or done == end:
            dt = time.time() - t_last
            m["images_per_sec"] = imgs / dt if dt > 0 else 0.0
            writer.write(done, m)
            history.append({"step": done, **m})
            t_last, imgs = time.time(), 0
        if done % config.train.checkpoint_every == 0 or done == end:
            checkpointing.save(mngr, done, state, train_iter.get_state(), meta)
        if config.train.eval_every and done % config.train.eval_every == 0 and done != num_steps:
            result = evaluate_model(model, state, val_source, config)
            writer.write(done, {f"eval/{k}": v for k, v in result.stats.items()})
    progress.close()
    if end < num_steps:
        writer.close()
        return {}

    result = evaluate_model(model, state, val_source, config)
    writer.write(num_steps, {f"eval/{k}": v for k, v in result.stats.items()})
    final = result.metrics()
    (workdir / "eval_final.json").write_text(json.dumps(final, indent=1))
    print(result.summary)
    plot_losses(history, workdir / "loss_curve.png")
    if config.train.visualize:
        predictions_png(model_cfg, state, val_source, config, workdir / "detections.png", meta["class_names"])
    writer.close()
    return final
