"""Command-line config overrides: a typo'd `--config.<path>=value` becomes one actionable line.

    config_cli.exit_on_unknown_override(sys.argv, default_config="configs/default.py")

ml_collections' `config_flags` reports an override of a field that does not exist with a
long traceback. `unknown_override_message` checks every `--config.<dotted.path>=value`
(or `--config.<path> value`) of argv against the config the command line selects
(`--config=FILE[:ARG]`, else the default) before the flags are parsed, walking the
nested ConfigDict generically, and names the nearest existing dotted path (difflib).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from typing import Any

FLAG = "config"


def _load_config(spec: str) -> Any:
    """`get_config()` of the Python config file `spec` ("FILE" or "FILE:ARG", as ml_collections reads it)."""
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_frcnn_cli_config", path)
    if module_spec is None or module_spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _children(node: Any) -> Mapping[str, Any] | None:
    """The named fields of a config node (ConfigDict, mapping or dataclass), or None for a leaf."""
    if isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__")):
        return {str(k): node[k] for k in node.keys()}
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
    return None


def config_paths(config: Any, prefix: str = "") -> list[str]:
    """Every dotted path of `config` (sections and leaves), e.g. ["data", "data.batch_size", ...]."""
    paths = []
    for name, child in (_children(config) or {}).items():
        path = f"{prefix}{name}"
        paths.append(path)
        if _children(child) is not None:
            paths.extend(config_paths(child, path + "."))
    return paths


def missing_path(config: Any, path: str) -> bool:
    """True when the dotted `path` names no field of `config` (indexing such as `a[0]` is not checked)."""
    node = config
    for name in path.split("."):
        if "[" in name:
            return False
        fields = _children(node)
        if fields is None:  # an override below a leaf: ml_collections reports that itself
            return False
        if name not in fields:
            return True
        node = fields[name]
    return False


def leaf_paths(config: Any, prefix: str = "") -> list[str]:
    """The dotted paths of `config`'s leaves (the fields that hold values), e.g. ["data.batch_size", ...]."""
    paths = []
    for name, child in (_children(config) or {}).items():
        if _children(child) is None:
            paths.append(f"{prefix}{name}")
        else:
            paths.extend(leaf_paths(child, f"{prefix}{name}."))
    return paths


def nearest_path(config: Any, path: str) -> str | None:
    """The existing dotted path of `config` most similar to `path` (difflib), or None.

    Leaves come first: those under the deepest section that `path` names correctly
    ("optim.lr" -> "optim.base_lr", not "optim"), then every leaf, then sections.
    """
    parts = path.split(".")
    node, depth = config, 0
    while depth < len(parts) - 1 and _children(node) is not None and parts[depth] in _children(node):
        node, depth = _children(node)[parts[depth]], depth + 1
    pools = []
    if depth and _children(node) is not None:
        pools.append(leaf_paths(node, ".".join(parts[:depth]) + "."))
    pools += [leaf_paths(config), config_paths(config)]
    for pool in pools:
        matches = difflib.get_close_matches(path, pool, n=1, cutoff=0.6)
        if matches:
            return matches[0]
    return None


def _overrides(argv: Sequence[str]) -> list[str]:
    prefix = f"--{FLAG}."
    return [arg[len(prefix) :].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def config_spec(argv: Sequence[str], default: str | None) -> str | None:
    """The `--config=FILE[:ARG]` (or `--config FILE`) of argv, else `default`; None when neither."""
    spec = default
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{FLAG}="):
            spec = arg.split("=", 1)[1]
        elif arg == f"--{FLAG}" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec or None


def unknown_override_message(argv: Sequence[str], default_config: str | None = None) -> str | None:
    """The one-line error for the first `--config.<path>` of argv naming no field, or None when all exist.

    The config is `--config=FILE[:ARG]` of argv, else `default_config`; when it cannot be
    loaded (or there is none) nothing is checked here and ml_collections reports the problem.
    Example: "--config.model.anchor_size: no such field; did you mean model.anchors.sizes?"
    """
    paths = _overrides(argv)
    spec = config_spec(argv, default_config)
    if not paths or spec is None:
        return None
    try:
        config = _load_config(spec)
    except Exception:  # noqa: BLE001 - a broken config file is reported by ml_collections' own loader
        return None
    for path in paths:
        if missing_path(config, path):
            near = nearest_path(config, path)
            hint = f"; did you mean {near}?" if near else f" (see {spec.partition(':')[0]})"
            return f"--{FLAG}.{path}: no such field{hint}"
    return None


def exit_on_unknown_override(argv: Sequence[str], default_config: str | None = None) -> None:
    """Prints "error: <unknown_override_message>" to stderr and exits with status 2, if there is one."""
    message = unknown_override_message(argv, default_config)
    if message:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


# --- inference settings shared by the argparse CLIs (predict, export) -------------------

POSTPROCESS_FLAGS = {  # flag -> (ModelConfig.roi_heads.postprocess field, type, help)
    "--score-thresh": ("score_thresh", float, "keep detections scoring above this, in [0, 1]"),
    "--nms-thresh": ("nms_thresh", float, "IoU of the per-class NMS, in [0, 1]"),
    "--detections-per-img": ("detections_per_img", int, "at most this many detections per image"),
}


def add_postprocess_arguments(parser, defaults: Mapping[str, Any] | None = None) -> None:
    """Adds --score-thresh, --nms-thresh, --detections-per-img (the model's roi_heads.postprocess).

    defaults: field -> default value (e.g. {"score_thresh": 0.5}); a field without one
    defaults to None, i.e. the checkpoint's own value. --score-threshold stays as a
    deprecated alias of --score-thresh.
    """
    defaults = dict(defaults or {})
    for flag, (field, kind, text) in POSTPROCESS_FLAGS.items():
        names = [flag, "--score-threshold"] if field == "score_thresh" else [flag]
        default = defaults.get(field)
        suffix = f" (default: {default})" if default is not None else " (default: the checkpoint's)"
        parser.add_argument(*names, dest=field, type=kind, default=default, help=text + suffix)


def postprocess_overrides(args) -> dict[str, Any]:
    """{field: value} of the post-process flags of parsed `args` (None: not given); ValueError names a bad one."""
    out = {}
    for flag, (field, _, _) in POSTPROCESS_FLAGS.items():
        value = getattr(args, field)
        if value is None:
            continue
        if field == "detections_per_img":
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        elif not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], got {value}")
        out[field] = value
    return out
