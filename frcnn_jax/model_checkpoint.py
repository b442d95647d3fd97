"""The exported-model format: variables (orbax) + model config and metadata (JSON).

A model checkpoint is a directory (what `python -m frcnn_jax.convert` writes, and what
`Detector.from_checkpoint`, `eval.py` and `predict` read):

    DIR/model.json     {"format": ..., "model": ModelConfig.to_dict() (nested sections), "metadata": {...}}
    DIR/variables/     orbax checkpoint of {"params": ..., "frozen": ...}

A training run's work directory is the other on-disk format (`frcnn_jax.run_checkpoint`):
its checkpoints hold the same variables plus the optimiser and input-iterator state.
`load_model` reads either.

Metadata keys used by the project: `class_names` (list, index = label, entry 0
"__background__"), `label_to_category_id` (dict str(label) -> dataset category id, for
COCO evaluation), `source` (where the weights came from).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from frcnn_jax import run_checkpoint
from frcnn_jax.modeling.config import ModelConfig

MODEL_FORMAT = "frcnn_jax.model/2"  # 2: the model config in sections (backbone, anchors, rpn, roi_heads)
_FLAT_CONFIG_FORMAT = "frcnn_jax.model/1"  # 1: a flat model config
MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


def _to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(x), tree)


def save_model(
    directory, variables: dict, model_config: ModelConfig | None, metadata: dict | None = None
) -> pathlib.Path:
    """Writes a model checkpoint atomically (to a temporary sibling, then renamed).

    variables: {"params": ..., "frozen": ...} pytrees of arrays. model_config may be None
    for a backbone-only checkpoint (then metadata must say what it holds).
    Returns the checkpoint directory. An existing checkpoint at `directory` is replaced.
    """
    directory = pathlib.Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(tmp / VARIABLES_DIR, _to_numpy(variables))
        ckptr.wait_until_finished()
        doc = {
            "format": MODEL_FORMAT,
            "model": None if model_config is None else model_config.to_dict(),
            "metadata": metadata or {},
        }
        (tmp / MODEL_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def is_model_checkpoint(directory) -> bool:
    d = pathlib.Path(directory)
    return (d / MODEL_JSON).is_file() and (d / VARIABLES_DIR).is_dir()


def read_model_json(directory) -> dict[str, Any]:
    path = pathlib.Path(directory) / MODEL_JSON
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not a frcnn_jax model checkpoint (no {MODEL_JSON})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e})") from None
    if doc.get("format") == _FLAT_CONFIG_FORMAT and doc.get("model") is None:
        return doc  # a backbone-only checkpoint: no model config, same layout
    if doc.get("format") != MODEL_FORMAT:
        old = doc.get("format") == _FLAT_CONFIG_FORMAT
        hint = " (written with the flat model config of older versions: convert it again)" if old else ""
        raise ValueError(
            f"{path}: unsupported checkpoint format {doc.get('format')!r}, expected {MODEL_FORMAT!r}{hint}"
        )
    return doc


def load_model(directory) -> tuple[ModelConfig | None, dict, dict]:
    """Reads a model checkpoint -> (ModelConfig or None, variables, metadata).

    A training work directory is accepted too (its latest checkpoint is read, see
    `frcnn_jax.run_checkpoint.load_model`).
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint {directory} does not exist")
    if not is_model_checkpoint(directory):
        return run_checkpoint.load_model(directory)
    doc = read_model_json(directory)
    variables = ocp.StandardCheckpointer().restore(directory.absolute() / VARIABLES_DIR)
    cfg = None if doc["model"] is None else ModelConfig.from_dict(doc["model"])
    return cfg, variables, doc.get("metadata", {})
