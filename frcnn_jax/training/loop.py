"""`train_and_evaluate(config, workdir)`: the loop behind `python train.py`.

Flax-examples style: build the data, the model and the train state, resume from the
latest checkpoint in `workdir` if there is one, then step, log, checkpoint and
evaluate. A new run starts from random weights, an ImageNet trunk (`train.init_backbone`)
or another detector's weights (`train.init_checkpoint`, `param_paths.with_checkpoint_weights`;
what was loaded and re-initialised is logged); `train.freeze` adds to the frozen
parameters. Everything that decides numbers lives in the pure functions it calls
(`FasterRCNN.losses`, `train_step`, the ops); this file only wires them together.

How the loop keeps an accelerator busy:
- No host sync between log steps. Each step is one jitted call,
  `(state, monitor) <- step(state, monitor, batch)`, dispatched asynchronously; the
  metrics stay on the device, summed in `monitor` (`frcnn_jax.training.monitor`), and are
  fetched every `train.log_every` steps (logged as means over those steps). The record of
  the first non-finite step is fetched before every checkpoint, log and evaluation, so
  training stops (`TrainingDiverged`, naming the step and term) before a checkpoint with
  non-finite parameters is written. `train.transfer_guard` ("allow" | "log" |
  "disallow") puts the stretch between fetches under `jax.transfer_guard_device_to_host`,
  to find (or forbid) accidental syncs.
- Input overlap: a `DevicePrefetcher` thread pulls batches from the grain pipeline and
  starts their sharded `device_put` while the current step runs (`train.prefetch`
  batches ahead).
- Memory: `train.xla_cpu_scheduler` picks XLA:CPU's schedule of the step ("memory"
  lowers the peak, `training.host_memory`); `train.malloc_mmap_threshold_mb` pins glibc's
  mmap threshold, so freed step buffers leave the process instead of fragmenting its
  heap; with one canvas the step is compiled ahead of the first call and the compiler's
  freed heap is returned to the OS
  (`model.remat` trades recomputation for memory, `modeling.config.REMAT_PARTS`).
- Checkpoints (`frcnn_jax.run_checkpoint`) hold the train state, the monitor and every
  process's input-iterator state in one orbax step, written asynchronously
  (`train.async_checkpoint`); the last save is awaited before the loop returns or raises.

Multi-process runs (`jax.distributed`): every process runs this loop on its own shard of
the data and takes part in checkpointing and evaluation; process 0 alone writes
config.json, metrics.jsonl, TensorBoard, eval_final.json, loss_curve.png and
detections.png.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from frcnn_jax import model_checkpoint, run_checkpoint
from frcnn_jax.data import builder as data_lib
from frcnn_jax.data import custom as custom_sources
from frcnn_jax.evaluation.model_eval import evaluate_model, make_forward, predictions_png
from frcnn_jax.evaluation.report import write_detections_json
from frcnn_jax.modeling import config as model_config
from frcnn_jax.modeling import param_paths
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
from frcnn_jax.training import host_memory, sharding
from frcnn_jax.training import monitor as monitor_lib
from frcnn_jax.training import optim as optim_lib
from frcnn_jax.training.metrics import MetricsWriter, Progress, plot_losses
from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule
from frcnn_jax.training.prefetch import DevicePrefetcher
from frcnn_jax.training.train_step import create_train_state, make_train_step, metric_names

log = logging.getLogger(__name__)


TRANSFER_GUARDS = ("allow", "log", "disallow")


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the loss term."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped a single-process run after checkpointing its current step."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def _stop_requests(enabled: bool):
    """While active, SIGTERM / SIGINT only record a request (read it with `requested()`).

    The loop then finishes the running step, saves it and stops: a clean exit that a
    rerun resumes from that very step. Only in a single-process run's main thread
    (processes of a multi-process run would have to agree on the step; they keep the
    default handlers and resume from the last periodic checkpoint).
    """
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    previous = {
        s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield lambda: received[0] if received else None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def optim_config(config: ml_collections.ConfigDict) -> OptimConfig:
    """`config.optim` as an OptimConfig; the schedule's length is the one step count, `train.num_steps`."""
    return OptimConfig.from_dict({**config.optim.to_dict(), "total_steps": int(config.train.num_steps)})


def with_mask_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config`, or a copy with `data.masks` on when the model is Mask R-CNN (`model.mask.enabled`):
    the training batches then carry each ground truth's mask crop (`gt_masks`, `gt_mask_boxes`)."""
    mask = config.model.get("mask", None)
    if not (mask is not None and mask.get("enabled", False)) or config.data.get("masks", False):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.data.masks = True
    return config


def _check_mask_source(model_cfg: ModelConfig, data, source=None, where: str = ""):
    """A mask model needs a source with instance masks: ValueError naming the source otherwise.

    source: a Python source given to `train_and_evaluate` (its `has_masks`), else the built-in
    `data.source` (a factory's source is checked when it is built)."""
    if not model_cfg.mask.enabled:
        return
    if source is not None:
        ok, name = bool(getattr(source, "has_masks", False)), f"{where} (its has_masks is not true)"
    elif data.source in data_lib.SOURCES:
        ok = data_lib.source_has_masks(data.source)
        name = f"tfds {data.tfds.name}" if data.source == "tfds" else data.source
        name = f"{name} (data.source={data.source!r})"
    else:
        return
    if not ok:
        raise ValueError(
            f"model.mask.enabled=True (Mask R-CNN) trains on instance masks, but the source {name} carries "
            "none; use data.source=coco_json (COCO JSON segmentations), shapes, or a source with has_masks"
        )


def validate_config(config: ml_collections.ConfigDict) -> tuple[ModelConfig, OptimConfig]:
    """Checks the whole config up front; raises ValueError naming the bad field.

    A mask model (`model.mask.enabled`) on a built-in source without instance masks (tfds)
    is refused here, naming the source; `train_and_evaluate` turns `data.masks` on for it."""
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    optim_cfg = optim_config(config)
    _check_mask_source(model_cfg, config.data)
    t = config.train
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints", "prefetch"):
        if int(t[name]) < 1:
            raise ValueError(f"train.{name}={t[name]!r}: must be >= 1")
    if t.transfer_guard not in TRANSFER_GUARDS:
        raise ValueError(f"train.transfer_guard={t.transfer_guard!r}: must be one of {TRANSFER_GUARDS}")
    if t.xla_cpu_scheduler not in host_memory.CPU_SCHEDULERS:
        raise ValueError(
            f"train.xla_cpu_scheduler={t.xla_cpu_scheduler!r}: must be one of {tuple(host_memory.CPU_SCHEDULERS)}"
        )
    if float(t.malloc_mmap_threshold_mb) < 0:
        raise ValueError(
            f"train.malloc_mmap_threshold_mb={t.malloc_mmap_threshold_mb!r}: must be >= 0 (0: glibc's own)"
        )
    for name in ("eval_every", "eval_max_images", "visualize"):
        if int(t[name]) < 0:
            raise ValueError(f"train.{name}={t[name]!r}: must be >= 0")
    optim_lib.check_freeze_pattern(str(t.freeze))
    if t.init_backbone and t.init_checkpoint:
        raise ValueError(
            f"train.init_backbone={t.init_backbone!r} and train.init_checkpoint={t.init_checkpoint!r}: "
            "set one (init_checkpoint already holds the backbone)"
        )
    data_lib.validate_data_config(config.data)
    return model_cfg, optim_cfg


def _check_resume_compatible(workdir: pathlib.Path, config: ml_collections.ConfigDict):
    """A work directory holds one run: its model must not change between restarts."""
    path = workdir / run_checkpoint.CONFIG_JSON
    if not path.exists():
        return
    saved_config = json.loads(path.read_text())
    saved = model_config.flatten(saved_config.get("model", {}))
    now = model_config.flatten(json.loads(json.dumps(config.model.to_dict(), default=list)))
    diffs = [
        f"model.{k}: saved {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    # which parameters train shapes the optimiser state
    saved_freeze = saved_config.get("train", {}).get("freeze", "")
    if saved_freeze != config.train.freeze:
        diffs.append(f"train.freeze: saved {saved_freeze!r}, now {config.train.freeze!r}")
    if diffs:
        raise ValueError(
            f"{workdir} holds a run with a different model config or train.freeze; use a new --workdir or the same config "
            f"({'; '.join(diffs[:5])})"
        )


def _read_init_checkpoint(path: str, cfg: ModelConfig) -> tuple[ModelConfig, dict, dict]:
    """`train.init_checkpoint` read and checked against the model -> (its ModelConfig, variables, metadata).

    path: a converted detector (`python -m frcnn_jax.convert`) or a training work
    directory (its latest checkpoint). Raises ValueError naming the field: not a
    detector, or a different architecture in fields the shapes do not show.
    """
    where = f"train.init_checkpoint={path!r}"
    try:
        src_cfg, variables, meta = model_checkpoint.load_model(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if src_cfg is None:
        raise ValueError(
            f"{where}: a {meta.get('kind', 'backbone')} checkpoint, not a detector; "
            "use train.init_backbone for an ImageNet ResNet"
        )
    theirs, mine = model_config.flatten(src_cfg.to_dict()), model_config.flatten(cfg.to_dict())
    for key in ARCHITECTURE_FIELDS:
        if theirs.get(key) != mine.get(key):
            raise ValueError(
                f"{where}: an architecture mismatch: the checkpoint's model.{key}={theirs.get(key)!r}, "
                f"the config's {mine.get(key)!r}"
            )
    if theirs.get("backbone.bn_eps") != mine.get("backbone.bn_eps"):
        log.warning(
            "train.init_checkpoint: the checkpoint ran with model.backbone.bn_eps=%r, this run uses %r "
            "(--config.model.backbone.bn_eps=%r keeps its outputs)",
            theirs.get("backbone.bn_eps"), mine.get("backbone.bn_eps"), theirs.get("backbone.bn_eps"),
        )  # fmt: skip
    return src_cfg, variables, meta


# Model fields that change what the weights mean without changing any shape: they must agree
# between `train.init_checkpoint` and the run (depth, width, anchors, ... show up as shapes).
ARCHITECTURE_FIELDS = ("arch", "backbone.stride_in_1x1")


def _init_variables(model: FasterRCNN, config, seed: int, *, load_weights: bool = True):
    """Random variables, with weights from `train.init_backbone` or `train.init_checkpoint` if set.

    init_backbone: the trunk (and the C4 head's layer4) from an ImageNet ResNet.
    init_checkpoint: every array of a detector / run (`param_paths.with_checkpoint_weights`:
    the class-dependent layers re-initialised when `model.num_classes` differs; what was
    loaded and re-initialised is logged).
    The backbone checkpoint is always checked; with load_weights=False (a resumed run,
    whose checkpoint replaces these values) neither is read.
    """
    path = config.train.init_backbone
    if path:  # check the backbone checkpoint before spending time on the model
        meta = model_checkpoint.read_model_json(path).get("metadata", {})
        if meta.get("kind") != "resnet_backbone":
            raise ValueError(
                f"train.init_backbone={path!r}: not a ResNet backbone checkpoint (kind {meta.get('kind')!r})"
            )
        backbone = model.cfg.backbone
        if meta.get("depth") != backbone.depth or backbone.width != 64:
            raise ValueError(
                f"train.init_backbone={path!r}: a ResNet-{meta.get('depth')} checkpoint cannot initialise "
                f"model.backbone.depth={backbone.depth}, model.backbone.width={backbone.width}"
            )
    init_ckpt = str(config.train.init_checkpoint)
    source = _read_init_checkpoint(init_ckpt, model.cfg) if init_ckpt and load_weights else None
    variables = init_variables(model, jax.random.key(seed))
    if not load_weights:
        return variables
    if path:
        _, backbone, _ = model_checkpoint.load_model(path)
        log.info("initialised the backbone from %s", path)
        variables = param_paths.with_imagenet_backbone(variables, backbone, model.cfg)
    if source is not None:
        src_cfg, src_vars, meta = source
        reinit = src_cfg.num_classes != model.cfg.num_classes
        try:
            variables, report = param_paths.with_checkpoint_weights(variables, src_vars, reinit_class_dependent=reinit)
        except param_paths.ParamMismatch as e:
            raise ValueError(f"train.init_checkpoint={init_ckpt!r}: {e}") from None
        _log_init_report(init_ckpt, meta, report, src_cfg.num_classes, model.cfg.num_classes)
    return variables


def _log_init_report(path: str, meta: dict, report: dict, old_classes: int, new_classes: int):
    n = report["loaded"]
    log.info(
        "train.init_checkpoint: loaded %d arrays from %s (%s): %d parameters, %d frozen batch-norm statistics",
        sum(n.values()), path, meta.get("source", "?"), n["params"], n["frozen"],
    )  # fmt: skip
    reinit = report["reinitialised"]
    if not reinit:
        log.info(
            "train.init_checkpoint: re-initialised 0 arrays (model.num_classes=%d as in the checkpoint)", new_classes
        )
        return
    log.info(
        "train.init_checkpoint: re-initialised %d class-dependent arrays (model.num_classes %d in the checkpoint, "
        "%d now): %s",
        len(reinit), old_classes, new_classes,
        "; ".join(f"{p} {old if old is not None else '(absent)'} -> {new}" for p, old, new in reinit),
    )  # fmt: skip


def _frozen_counts(variables: dict, cfg: ModelConfig, freeze: str) -> tuple[int, int]:
    """(parameter arrays frozen in all, of which matched by `train.freeze`); ValueError if it matches none."""
    paths = ["/".join(p) for p in param_paths.flat_paths(variables["params"])]
    by_stage = param_paths.frozen_param_paths(cfg)
    frozen = [p for p in paths if optim_lib.is_frozen_path(p, by_stage, freeze)]
    matched = [p for p in paths if freeze and optim_lib.is_frozen_path(p, (), freeze)]
    if freeze and not matched:
        raise ValueError(
            f"train.freeze={freeze!r}: matches no parameter path (re.match from the start; paths look like "
            f"{paths[0]!r}, {paths[-1]!r})"
        )
    return len(frozen), len(matched)


def _barrier(name: str, timeout_s: int = 1800):
    """Multi-process: waits until every process is here (through the coordination service, no collective)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(
            f"frcnn_jax:{name}", timeout=timeout_s, processes=set(range(jax.process_count()))
        )


def _run_meta(train_source, config) -> dict:
    """What a checkpoint records beside the weights, for inference from the work directory."""
    return {
        "class_names": ["__background__"] + list(train_source.category_names),
        "label_to_category_id": {str(k): int(v) for k, v in train_source.label_to_category_id.items()},
        "min_size": int(config.data.test_min_size),
        "max_size": int(config.data.max_size),
        "canvases": [list(c) for c in config.data.canvases],
    }


def _abstract(tree, sharding_):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir,
    *,
    stop_after_steps: int | None = None,
    train_source=None,
    eval_source=None,
) -> dict[str, Any]:
    """Trains (resuming from `workdir` if it holds checkpoints), then evaluates.

    Args:
      config: a config from `configs/` (see configs/common.py for the fields).
      workdir: output directory: checkpoints, metrics.jsonl, TensorBoard events,
        loss_curve.png, eval_final.json, eval_detections.json, detections.png.
      stop_after_steps: stop (as if interrupted) after this many steps of this call,
        after checkpointing; the next call resumes. None runs to train.num_steps.
      train_source, eval_source: Python data sources (the protocol of
        `frcnn_jax.data.custom`) used instead of the ones `config.data.source` builds
        (each independently; None: from the config). A resumed run must be given the
        same sources (its input position is an index into them).
    Returns:
      the final evaluation metrics (AP, AP50, ... per_class), or {} if stopped early.
    """
    workdir = pathlib.Path(workdir)
    # Everything is checked before anything is written.
    config = with_mask_data(config)  # Mask R-CNN: the batches carry the masks
    model_cfg, optim_cfg = validate_config(config)
    data_name = "train_source" if train_source is not None else config.data.source
    train_source = (
        data_lib.build_source(config.data, "train")
        if train_source is None
        else custom_sources.as_source(train_source, "train_source")
    )
    val_source = (
        data_lib.build_source(config.data, "val")
        if eval_source is None
        else custom_sources.as_source(eval_source, "eval_source")
    )
    if train_source is not None and data_name == "train_source":
        _check_mask_source(model_cfg, config.data, train_source, "train_source")
    if train_source.num_object_classes + 1 != model_cfg.num_classes:
        raise ValueError(
            f"model.num_classes={model_cfg.num_classes} but the {data_name} data has "
            f"{train_source.num_object_classes} classes (+1 background = {train_source.num_object_classes + 1})"
        )
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.data.batch_size, mesh)
    multi_process = jax.process_count() > 1
    is_writer = jax.process_index() == 0
    if multi_process and len(config.data.canvases) > 1:
        raise ValueError(
            f"data.canvases={config.data.canvases!r}: multi-host training needs a single canvas (each host "
            "groups its own images by canvas, so hosts could otherwise disagree on a step's shape)"
        )
    _check_resume_compatible(workdir, config)
    if float(config.train.malloc_mmap_threshold_mb) > 0:
        host_memory.pin_mmap_threshold(float(config.train.malloc_mmap_threshold_mb))
    workdir.mkdir(parents=True, exist_ok=True)
    if is_writer:
        run_checkpoint.write_config(workdir, config.to_dict())

    model = FasterRCNN(model_cfg)
    forward = make_forward(model)  # the evaluations share its compiled programs
    lr_fn = learning_rate_schedule(optim_cfg)
    ckpt = run_checkpoint.RunCheckpointer(
        workdir, max_to_keep=config.train.keep_checkpoints, async_save=bool(config.train.async_checkpoint)
    )
    resuming = ckpt.latest_step() is not None
    variables = _init_variables(model, config, config.seed, load_weights=not resuming)
    freeze = str(config.train.freeze)
    n_frozen, n_matched = _frozen_counts(variables, model_cfg, freeze)
    log.info(
        "training %d of %d parameter arrays (frozen: %d; model.backbone.freeze_at=%d, train.freeze=%r matches %d)",
        len(jax.tree.leaves(variables["params"])) - n_frozen, len(jax.tree.leaves(variables["params"])), n_frozen,
        model_cfg.backbone.freeze_at, freeze, n_matched,
    )  # fmt: skip
    state, tx = create_train_state(model, variables, optim_cfg, config.seed, freeze)
    rep = sharding.replicated(mesh)
    monitor = monitor_lib.init_monitor(metric_names(model_cfg))

    place = sharding.process_batch_to_global if multi_process else sharding.put_batch
    host_iter = data_lib.train_iterator(train_source, config.data, seed=config.seed)
    train_iter = DevicePrefetcher(host_iter, lambda batch: place(batch, mesh), depth=int(config.train.prefetch))
    meta = _run_meta(train_source, config)
    writer = progress = None
    stack = contextlib.ExitStack()
    try:
        if resuming:
            state, monitor, _ = ckpt.restore(_abstract(state, rep), _abstract(monitor, rep), train_iter)
            log.info("resumed from step %d", int(state.step))
        else:
            state, monitor = jax.device_put((state, monitor), rep)
        train_step = make_train_step(model, tx, lr_fn)

        def loop_step(state, monitor, batch):
            state, metrics = train_step(state, batch)
            return state, monitor_lib.accumulate(monitor, metrics, state.step)

        options = host_memory.step_compiler_options(str(config.train.xla_cpu_scheduler), model.cfg.cpu_kernels)
        step_fn = sharding.shard_carry_step(loop_step, mesh, state, monitor, compiler_options=options)
        start = int(state.step)
        num_steps = int(config.train.num_steps)
        end = num_steps if stop_after_steps is None else min(num_steps, start + stop_after_steps)
        first_batch = None
        if start < end and (multi_process or len(config.data.canvases) == 1):
            # One canvas, one shape: compile ahead of the first step and hand the compiler's
            # freed heap back to the OS before training allocates. Multi-process runs then
            # meet: the first step's cross-process collectives (gloo on CPU) give up when
            # processes arrive more than ~30 s apart, and compile times differ.
            first_batch = next(train_iter)
            step_fn = step_fn.lower(state, monitor, first_batch).compile()
            host_memory.release_freed_heap()
            if multi_process:
                _barrier("train_step_compiled")
        reset_window = jax.jit(monitor_lib.reset_window, donate_argnums=0, out_shardings=rep)

        # resumed_from is 0 without a checkpoint too: a run killed before its first one left rows behind
        writer = MetricsWriter(workdir, enabled=is_writer, resumed_from=start)
        history = writer.read_history()
        progress = Progress(start, num_steps, enabled=is_writer)
        t = config.train
        guard = str(t.transfer_guard)
        t_window, steps_in_window = time.perf_counter(), 0
        stop_requested = stack.enter_context(_stop_requests(not multi_process))
        for step in range(start, end):
            done = step + 1
            with jax.transfer_guard_device_to_host(guard):  # no device-to-host transfer from here...
                batch = next(train_iter) if first_batch is None else first_batch
                first_batch = None
                state, monitor = step_fn(state, monitor, batch)
                progress.advance(done)
            steps_in_window += 1  # ...to here: the step runs while the loop goes on
            interrupted = stop_requested()
            log_now = done % t.log_every == 0 or done == end or bool(interrupted)
            checkpoint_now = done % t.checkpoint_every == 0 or done == end or bool(interrupted)
            eval_now = bool(t.eval_every) and done % t.eval_every == 0 and done != num_steps
            if not (log_now or checkpoint_now or eval_now):
                continue
            host = jax.device_get(monitor)  # the one sync: waits for this step
            message = monitor_lib.divergence_message(host)
            if message:
                raise TrainingDiverged(
                    f"{message} (last good checkpoint: step {ckpt.latest_step()}; it is left intact)"
                )
            if log_now:
                metrics = monitor_lib.window_means(host)
                dt = time.perf_counter() - t_window
                metrics["images_per_sec"] = steps_in_window * config.data.batch_size / dt if dt > 0 else 0.0
                writer.write(done, metrics)
                history.append({"step": done, **metrics})
                progress.show(metrics)
                monitor = reset_window(monitor)
            if eval_now:  # before the save: a kill between the two re-runs this evaluation
                _barrier(f"evaluation_{done}")
                result = evaluate_model(model, state, val_source, config, progress=False, forward=forward)
                writer.write(done, {f"eval/{k}": v for k, v in result.stats.items()})
            if checkpoint_now:
                ckpt.save(done, state, monitor, train_iter, meta)
            if log_now or eval_now:
                t_window, steps_in_window = time.perf_counter(), 0
            if interrupted:
                ckpt.wait()
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(interrupted).name} after step {done}; its checkpoint is saved: "
                    "rerun the same command to resume",
                    interrupted,
                )
        progress.close()
        ckpt.wait()
        if end < num_steps:
            return {}

        _barrier("final_evaluation")
        result = evaluate_model(model, state, val_source, config, forward=forward)
        writer.write(num_steps, {f"eval/{k}": v for k, v in result.stats.items()})
        final = result.metrics()
        if is_writer:
            (workdir / "eval_final.json").write_text(json.dumps(final, indent=1))
            write_detections_json(workdir / "eval_detections.json", result.detections)  # COCO results format
            print(result.summary)
            plot_losses(history, workdir / "loss_curve.png")
            if t.visualize:  # process 0 alone: on its host copy of the (replicated) parameters
                variables = {"params": state.params, "frozen": state.frozen}
                variables = jax.device_get(variables) if multi_process else variables
                predictions_png(
                    model_cfg, variables, val_source, config, workdir / "detections.png", meta["class_names"]
                )
        return final
    finally:
        if progress is not None:
            progress.close()  # before any error is printed: the bar's line is finished first
        with contextlib.suppress(Exception):
            train_iter.close()
        ckpt.wait()  # the last save is committed before we return or raise
        ckpt.close()
        if writer is not None:
            writer.close()
        stack.close()
