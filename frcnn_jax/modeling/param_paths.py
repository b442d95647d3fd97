"""Everything that knows the parameter tree's paths: frozen parameters, backbone initialisation.

The tree follows torchvision's module names (see `faster_rcnn.py`): the ResNet trunk at
`backbone/body/{conv1, bn1, layer1, ...}`, and for C4 the trunk's `layer4` as the box
head at `roi_heads/box_head/layer4`.
"""

from __future__ import annotations

import jax

from frcnn_jax.modeling.architectures import architecture
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.resnet import frozen_param_prefixes

TRUNK = ("backbone", "body")
BOX_HEAD = ("roi_heads", "box_head")


def frozen_param_paths(cfg: ModelConfig) -> tuple[str, ...]:
    """'/'-joined parameter-path prefixes frozen by `backbone.freeze_at` (stem, early trunk stages): never updated."""
    return tuple("/".join((*TRUNK, p)) for p in frozen_param_prefixes(cfg.backbone.freeze_at))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def with_imagenet_backbone(variables: dict, backbone: dict, cfg: ModelConfig) -> dict:
    """`variables` with the trunk (and, for C4, the box head's layer4) taken from an ImageNet ResNet.

    variables: {"params", "frozen"} of a `FasterRCNN(cfg)`; backbone: {"params", "frozen"}
    of the 4-stage trunk (`convert.convert_resnet`: conv1, bn1, layer1..layer4).
    Returns a new tree (the inputs are not modified); stages the model's trunk does not
    have (layer4 for C4) are skipped there.
    """
    out = {k: jax.tree.map(lambda x: x, variables[k]) for k in ("params", "frozen")}
    for coll in ("params", "frozen"):
        body = _at(out[coll], TRUNK)
        for name in list(body):
            body[name] = backbone[coll][name]
    for stage in architecture(cfg).box_head_trunk_stages:  # C4: layer4 is the box head
        for coll in ("params", "frozen"):
            _at(out[coll], BOX_HEAD)[stage] = backbone[coll][stage]
    return out


# --- starting from another model's weights (`train.init_checkpoint`) ---------------------

# Parameter-path prefixes (tuples of module names) whose shapes depend on
# `model.num_classes`: re-initialised, not loaded, when a checkpoint with another class
# count starts a run. A class-dependent head joins with one line here.
CLASS_DEPENDENT = (
    ("roi_heads", "box_predictor"),  # cls_score [R, C], bbox_pred [R, 4C]
    ("roi_heads", "mask_predictor", "mask_fcn_logits"),  # 1x1 conv [1, 1, C', K] (Mask R-CNN)
)


class ParamMismatch(ValueError):
    """A checkpoint's variables do not fit the model; the message names the parameters."""


def path_str(path: tuple[str, ...]) -> str:
    """('roi_heads', 'box_predictor', 'cls_score', 'kernel') -> 'roi_heads/box_predictor/cls_score/kernel'."""
    return "/".join(path)


def flat_paths(tree) -> dict[tuple[str, ...], object]:
    """Nested dict of arrays -> {path tuple: leaf} (the keys of a Flax variable collection)."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(str(getattr(k, "key", k)) for k in key_path)] = leaf
    return out


def is_class_dependent(path: tuple[str, ...]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in CLASS_DEPENDENT)


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return out


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def with_checkpoint_weights(variables: dict, source: dict, *, reinit_class_dependent: bool) -> tuple[dict, dict]:
    """`variables` with every array of `source` whose path and shape match loaded.

    variables: {"params", "frozen"} of a freshly initialised `FasterRCNN(cfg)`;
    source: {"params", "frozen"} of another model of the same architecture (a converted
    detector, a run's checkpoint). reinit_class_dependent: the two class counts differ,
    so the `CLASS_DEPENDENT` arrays keep their fresh values (whatever their shapes).
    Every other array must be in `source` with the same shape, and `source` must hold no
    array the model lacks: otherwise `ParamMismatch` naming the parameters (up to 5, with
    the count).

    Returns (new variables, report): report = {"loaded": {collection: count},
    "reinitialised": [(path, old shape or None, new shape), ...] ('/'-joined paths,
    params first)}. The inputs are not modified; loaded arrays keep the source's values
    (cast to the model's dtype).
    """
    out, loaded, reinit, problems = {}, {}, [], []
    for coll in ("params", "frozen"):
        mine, theirs = flat_paths(variables.get(coll, {})), flat_paths(source.get(coll, {}))
        new, count = {}, 0
        for path, leaf in mine.items():
            old = theirs.get(path)
            if reinit_class_dependent and is_class_dependent(path):
                reinit.append((path_str(path), None if old is None else _shape(old), _shape(leaf)))
                new[path] = leaf
            elif old is None:
                problems.append(f"{path_str(path)} {_shape(leaf)} is missing from the checkpoint")
                new[path] = leaf
            elif _shape(old) != _shape(leaf):
                problems.append(f"{path_str(path)}: checkpoint shape {_shape(old)}, model shape {_shape(leaf)}")
                new[path] = leaf
            else:
                new[path] = jax.numpy.asarray(old, dtype=leaf.dtype)
                count += 1
        problems += [
            f"{path_str(path)} {_shape(x)} is in the checkpoint but not in the model"
            for path, x in theirs.items()
            if path not in mine and not (reinit_class_dependent and is_class_dependent(path))
        ]
        out[coll], loaded[coll] = _unflatten(new), count
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ParamMismatch(f"{len(problems)} parameter(s) do not match the model: " + "; ".join(problems[:5]) + more)
    return out, {"loaded": loaded, "reinitialised": reinit}
