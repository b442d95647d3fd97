"""The training-run format: a work directory of orbax checkpoints that resume exactly.

    WORKDIR/config.json                      the run's full config (process 0, at start)
    WORKDIR/checkpoints/<step>/state/        TrainState: params, frozen BN, optimiser, step, rng
    WORKDIR/checkpoints/<step>/monitor/      the device-side metric sums of the open log window
    WORKDIR/checkpoints/<step>/data/process_<i>-of-<n>.json
                                             each process's input-iterator state (grain's handler)
    WORKDIR/checkpoints/<step>/meta/         format, class names, category mapping, canvases

One step is one orbax checkpoint holding every item of every process: orbax writes it into
a temporary directory and renames it only when all of it is written, so a step is either
complete or absent whatever moment the process is killed at (a leftover temporary
directory is ignored and cleaned up by the next run). The last `max_to_keep` steps are
kept.

Saving is asynchronous by default: `save` returns once the arrays are copied to host
memory and every process has written its iterator state; orbax writes the files in a
background thread while training continues. `wait()` blocks until the last save is
committed (the loop calls it after its final save and before it returns or raises).

The exported-model format (`model.json` + variables, what `frcnn_jax.convert` writes) is
`frcnn_jax.model_checkpoint`; `load_model` here reads a run's latest variables in the same
(ModelConfig, variables, metadata) form.
"""

from __future__ import annotations

import json
import pathlib

import jax
import orbax.checkpoint as ocp

from frcnn_jax.io_utils import write_atomic
from frcnn_jax.modeling.config import ModelConfig

RUN_FORMAT = "frcnn_jax.run/2"
CONFIG_JSON = "config.json"
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "monitor", "data", "meta")


def _grain_args():
    from grain import checkpoint as grain_checkpoint  # orbax handlers for grain iterators

    return grain_checkpoint.CheckpointSave, grain_checkpoint.CheckpointRestore


class RunCheckpointer:
    """orbax `CheckpointManager` over WORKDIR/checkpoints with this format's items.

    Every process of a multi-process run constructs one and calls `save` / `restore`
    collectively (same steps, same order); orbax coordinates the processes.
    """

    def __init__(self, workdir, *, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state, monitor, data_iterator, meta: dict, *, wait: bool = False):
        """Starts saving `step` (blocking until the arrays are on the host; see the module doc).

        state, monitor: pytrees of jax.Arrays (replicated or sharded; orbax writes each
        array once across processes). data_iterator: a grain `DatasetIterator` whose
        `get_state()` is the state after the last batch the saved step consumed.
        wait: block until the checkpoint is committed.
        """
        grain_save, _ = _grain_args()
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                monitor=ocp.args.StandardSave(monitor),
                data=grain_save(data_iterator),
                meta=ocp.args.JsonSave({"format": RUN_FORMAT, **meta}),
            ),
        )
        if wait:
            self.wait()

    def restore(self, abstract_state, abstract_monitor, data_iterator, step: int | None = None):
        """(state, monitor, meta) of `step` (default: the latest); sets `data_iterator`'s state.

        abstract_state / abstract_monitor: the trees to restore into (`jax.eval_shape` of
        fresh ones, or `jax.ShapeDtypeStruct`s with shardings).
        Raises ValueError, naming the step and what is missing, for a checkpoint this
        code cannot resume exactly (an older format, another process count).
        """
        step = self.latest_step() if step is None else step
        self._check_resumable(step)
        _, grain_restore = _grain_args()
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                monitor=ocp.args.StandardRestore(abstract_monitor),
                data=grain_restore(data_iterator),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], out["monitor"], out["meta"]

    def _check_resumable(self, step: int):
        step_dir = self.directory / str(step)
        missing = [item for item in ITEMS if not (step_dir / item).is_dir()]
        if missing:
            raise ValueError(
                f"{step_dir}: written by an older frcnn_jax (no {', '.join(missing)} in the checkpoint), so the "
                "run cannot resume exactly; start a new --workdir (the weights still load for evaluation)"
            )
        n, i = jax.process_count(), jax.process_index()
        data_file = step_dir / "data" / f"process_{i}-of-{n}.json"
        if not data_file.is_file():
            found = sorted(p.name for p in (step_dir / "data").glob("process_*.json"))
            raise ValueError(
                f"{step_dir}: no input-iterator state for process {i} of {n} (the checkpoint has {found}); "
                "resume with the number of processes that wrote it"
            )

    def wait(self):
        """Blocks until every started save is committed."""
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.close()


def write_config(workdir, config_dict: dict):
    """WORKDIR/config.json, atomically (`io_utils.write_atomic`)."""
    path = pathlib.Path(workdir) / CONFIG_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(config_dict, indent=2, sort_keys=True, default=list))


def read_config(workdir) -> dict:
    path = pathlib.Path(workdir) / CONFIG_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{workdir}: not a training work directory (no {CONFIG_JSON})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None


def load_model(workdir) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, {"params", "frozen"}, metadata) of a work directory's latest checkpoint.

    Also accepts WORKDIR/checkpoints or WORKDIR/checkpoints/<step>. Arrays come back as
    numpy (host) arrays; only the state and meta items are read.
    """
    path = pathlib.Path(workdir).absolute()
    step = None
    if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
        step, path = int(path.name), path.parent.parent
    elif path.name == CHECKPOINT_DIR:
        path = path.parent
    config = read_config(path)
    mngr = RunCheckpointer(path, read_only=True)._mngr
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: no checkpoint saved yet in {path / CHECKPOINT_DIR}")
    if step not in mngr.all_steps():
        raise FileNotFoundError(f"{path / CHECKPOINT_DIR / str(step)}: no such checkpoint step")
    # Onto this process's first device, whatever devices wrote it (another process count,
    # an accelerator), then to host numpy arrays.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = ocp.StandardCheckpointHandler().metadata(path / CHECKPOINT_DIR / str(step) / "state")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved.tree)
    out = mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    )
    out = {"state": jax.device_get(out["state"]), "meta": out["meta"]}
    state = out["state"]
    meta = dict(out["meta"])
    meta.pop("format", None)
    meta.setdefault("source", f"training checkpoint {path} step {step}")
    model_cfg = ModelConfig.from_dict(config["model"])
    return model_cfg, {"params": state["params"], "frozen": state["frozen"]}, meta
