"""Training checkpoints: orbax CheckpointManager over the work directory.

    WORKDIR/config.json                 the run's full config (written at start)
    WORKDIR/checkpoints/<step>/state    TrainState (params, frozen BN, optimiser, step, rng)
    WORKDIR/checkpoints/<step>/data     input-iterator state (JSON), so a resumed run
                                        continues with exactly the next batch
    WORKDIR/checkpoints/<step>/meta     class names, category mapping, canvas settings

orbax writes each step into a temporary directory and renames it when complete, so an
interrupted save never leaves a half-written checkpoint behind; the last K are kept.
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


def manager(workdir, max_to_keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: Any, meta: dict):
    """Saves one step (blocking). data_state must be JSON-serialisable."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_get(state)),
            data=ocp.args.JsonSave({"iterator": data_state}),
            meta=ocp.args.JsonSave(meta),
        ),
    )
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """(state, data_state, meta) of `step` (default: latest). abstract_state gives the tree structure."""
    step = mngr.latest_step() if step is None else step
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out["state"], out["data"]["iterator"], out["meta"]


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
