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
