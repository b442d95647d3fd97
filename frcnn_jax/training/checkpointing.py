"""Training checkpoints: orbax CheckpointManager over the work directory.

    WORKDIR/config.json                 the run's full config (written at start)
    WORKDIR/checkpoints/<step>/state    TrainState (params, frozen BN, optimiser, step, rng)
    WORKDIR/checkpoints/<step>/meta     class names, category mapping, canvas settings
    WORKDIR/data_state/<step>.process<i>.json
                                        each host's input-iterator state, so a resumed
                                        run continues with exactly the next batch

orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never leaves a half-written checkpoint behind; the last K are kept.
Iterator states are per host (each reads its own shard), written atomically by every
process after the step is committed, and pruned with the steps orbax deletes.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from frcnn_jax.modeling.config import ModelConfig

CONFIG_JSON = "config.json"
CHECKPOINT_DIR = "checkpoints"
DATA_STATE_DIR = "data_state"


def manager(workdir, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _data_state_path(mngr: ocp.CheckpointManager, step: int) -> pathlib.Path:
    workdir = pathlib.Path(mngr.directory).parent
    return workdir / DATA_STATE_DIR / f"{step}.process{jax.process_index()}.json"


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: Any, meta: dict):
    """Saves one step (blocking): train state and metadata (orbax), this host's iterator state (JSON)."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(state)), meta=ocp.args.JsonSave(meta)),
    )
    mngr.wait_until_finished()
    path = _data_state_path(mngr, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data_state))
    tmp.replace(path)
    kept = set(mngr.all_steps())
    for old in path.parent.glob(f"*.process{jax.process_index()}.json"):
        if int(old.name.split(".")[0]) not in kept:
            old.unlink(missing_ok=True)


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """(state, this host's data_state, meta) of `step` (default: latest).

    abstract_state gives the tree structure (e.g. `jax.eval_shape` of a fresh state).
    """
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
    )
    path = _data_state_path(mngr, step)
    try:
        data_state = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint step {step} has no input-iterator state for this host ({path}); "
            "the run cannot resume exactly"
        ) from None
    return out["state"], data_state, out["meta"]


def write_config(workdir, config_dict: dict):
    path = pathlib.Path(workdir) / CONFIG_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config_dict, indent=2, sort_keys=True, default=list))
    tmp.replace(path)


def read_config(workdir) -> dict:
    path = pathlib.Path(workdir) / CONFIG_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{workdir}: not a training work directory (no {CONFIG_JSON})") from None


def load_model_from_workdir(workdir) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, {"params", "frozen"}, metadata) from a work directory's latest checkpoint.

    Also accepts WORKDIR/checkpoints or WORKDIR/checkpoints/<step>.
    """
    path = pathlib.Path(workdir).absolute()
    step = None
    if path.name.isdigit() and path.parent.name == CHECKPOINT_DIR:
        step, path = int(path.name), path.parent.parent
    elif path.name == CHECKPOINT_DIR:
        path = path.parent
    config = read_config(path)
    mngr = manager(path, read_only=True)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: no checkpoint saved yet in {path / CHECKPOINT_DIR}")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    state = out["state"]
    model_cfg = ModelConfig.from_dict(config["model"])
    meta = dict(out["meta"])
    meta.setdefault("source", f"training checkpoint {path} step {step}")
    return model_cfg, {"params": state["params"], "frozen": state["frozen"]}, meta
