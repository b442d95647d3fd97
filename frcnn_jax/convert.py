"""Import torchvision checkpoints: state dict (.pth) -> frcnn_jax model checkpoint.

    python -m frcnn_jax.convert --arch fasterrcnn_resnet50_fpn --checkpoint model.pth --out DIR

Architectures:
  fasterrcnn_resnet50_fpn  torchvision's own model (v1), e.g. the published COCO weights
                           (fasterrcnn_resnet50_fpn_coco-258fb6c6.pth, box AP 37.0).
  fasterrcnn_resnet50_c4   a torchvision `FasterRCNN` assembled as the R-50-C4 model:
                           backbone.body.{conv1,bn1,layer1..3}.*, rpn.head.*,
                           roi_heads.box_head.layer4.*, roi_heads.box_predictor.*.
  maskrcnn_resnet50_fpn    torchvision's maskrcnn_resnet50_fpn (v1): the FPN keys plus
                           roi_heads.mask_head.{0..3}.0.* (files before torchvision 0.13:
                           roi_heads.mask_head.mask_fcn{1..4}.*) and roi_heads.mask_predictor.*.
  maskrcnn_resnet50_c4     the R-50-C4 keys plus roi_heads.mask_predictor.*; the mask head is
                           the box head's res5: roi_heads.mask_head.* (present when the model
                           was assembled from torchvision parts) must equal
                           roi_heads.box_head.layer4.*.
  resnet50, resnet101      a plain ImageNet ResNet-50 / ResNet-101 state dict, as backbone
                           initialisation for training (`train.init_backbone`; fc.* is ignored).

The file is read with `torch.load(..., weights_only=True)`: a checkpoint never runs code.
Layouts are converted (OIHW -> HWIO convolutions, transposed linear layers, FPN fc6
columns permuted from torchvision's (C, y, x) flatten order to NHWC) and frozen
batch-norm buffers are carried exactly. Mind the eps: torchvision's published COCO
weights run with FrozenBatchNorm eps 0.0 (the default here for the FPN model);
checkpoints trained with torchvision's default `FrozenBatchNorm2d` use 1e-5.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from frcnn_jax import model_checkpoint as ckpt
from frcnn_jax.categories import COCO_CATEGORY_NAMES_91
from frcnn_jax.modeling import config as model_config
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables

# Plain ImageNet ResNets (backbone initialisation): arch -> depth.
RESNET_ARCHS = {"resnet50": 50, "resnet101": 101}
STATE_DICT_ARCHS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_c4", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_c4",
    *RESNET_ARCHS,
)  # fmt: skip
_MASK_ARCHS = {"maskrcnn_resnet50_fpn": "fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_c4": "fasterrcnn_resnet50_c4"}
_C4_SHARED = ("roi_heads.mask_head.", "roi_heads.box_head.layer4.")  # one module under two names
# torchvision buffers/keys that carry no model state for inference.
_IGNORED_SUFFIXES = ("num_batches_tracked",)


class ConversionError(ValueError):
    """A state dict does not match the requested architecture (message lists the keys)."""


_RESAVE = "re-save its weights where it was written: torch.save(model.state_dict(), path)"


def _load_error_line(path: pathlib.Path, error: Exception) -> str:
    """torch.load's (multi-line) refusal -> one line saying what the file is and how to re-save it."""
    import re

    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:  # a raw pickle of Python objects (a whole model, an optimizer, ...), never unpickled here
        return f"{path}: not a weights-only state dict (it pickles the Python object {found.group(1)}); {_RESAVE}"
    if "WeightsUnpickler error:" in text:  # corrupt, or not a torch file at all
        tail = text.split("WeightsUnpickler error:")[-1]
        detail = next((line.strip() for line in tail.splitlines() if line.strip()), "")
        return f"{path}: cannot be read as a torch state dict (torch's weights-only loader: {detail})"
    first = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    return f"{path}: cannot be read as a torch state dict ({type(error).__name__}: {first})"


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Loads a .pth state dict safely (weights_only=True) as float32 numpy arrays."""
    import torch

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises various types for corrupt or unsafe files
        raise ConversionError(_load_error_line(path, e)) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k: v.detach().cpu().float().numpy() for k, v in obj.items()}


# --- key mapping ----------------------------------------------------------------------


def _torch_module_path(path: tuple[str, ...]) -> list[str]:
    """Our module names -> torchvision's (downsample_0 -> downsample.0, inner_blocks_2 -> inner_blocks.2)."""
    out = []
    for name in path:
        for prefix in ("downsample_", "inner_blocks_", "layer_blocks_"):
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                name = f"{prefix[:-1]}.{name[len(prefix) :]}"
                break
        out.append(name)
    return out


def _candidates(collection: str, path: tuple[str, ...]) -> list[str]:
    """torchvision keys that may hold our variable `collection/path` (newest naming first)."""
    *modules, leaf = path
    base = ".".join(_torch_module_path(tuple(modules)))
    if collection == "frozen":
        return [f"{base}.{leaf}"]
    name = "weight" if leaf == "kernel" else leaf
    keys = [f"{base}.{name}"]
    # torchvision >= 0.13 wraps FPN convs and the RPN conv in Conv2dNormActivation.
    if modules and modules[-1].startswith(("inner_blocks_", "layer_blocks_")):
        keys.insert(0, f"{base}.0.{name}")
    if tuple(modules[-2:]) == ("head", "conv") and modules[0] == "rpn":
        keys.insert(0, f"{base}.0.0.{name}")
    # torchvision < 0.13 named the FPN mask head's convs mask_fcn1..4 (now mask_head.{i}.0).
    if tuple(modules[:2]) == ("roi_heads", "mask_head") and len(modules) == 4 and modules[2].isdigit():
        keys.insert(0, f"roi_heads.mask_head.mask_fcn{int(modules[2]) + 1}.{name}")
    return keys


def _transform(path: tuple[str, ...], value: np.ndarray, fc6_side: int) -> np.ndarray:
    """torchvision layout -> ours for the variable at `path`."""
    if path[-1] != "kernel":
        return value
    if value.ndim == 4 and path[-2] == "conv5_mask":  # ConvTranspose2d [in, out, kh, kw] -> [kh, kw, in, out]
        return value.transpose(2, 3, 0, 1)
    if value.ndim == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if path[-2] == "fc6":
        # torchvision flattens pooled [C, S, S] as (c, y, x); ours flattens NHWC (y, x, c).
        out_f, in_f = value.shape
        c = in_f // (fc6_side * fc6_side)
        if c * fc6_side * fc6_side == in_f:
            return value.reshape(out_f, c, fc6_side, fc6_side).transpose(2, 3, 1, 0).reshape(in_f, out_f)
    return value.T  # linear [out, in] -> [in, out]


def convert_variables(
    state_dict: dict[str, np.ndarray],
    template: dict,
    ignore: Callable[[str], bool] = lambda k: False,
    fc6_side: int = 7,
) -> dict:
    """Fills `template` ({"params", "frozen"} pytrees) from a torchvision state dict.

    ignore marks state-dict keys that are expected to be left over; fc6_side is the
    pooled size flattened into the FPN head's fc6.
    Raises ConversionError listing every missing key, unexpected key and shape mismatch.
    """
    used: set[str] = set()
    missing, mismatched = [], []

    def fill(collection):
        def one(path_keys, leaf):
            path = tuple(k.key for k in path_keys)
            cands = _candidates(collection, path)
            key = next((c for c in cands if c in state_dict), None)
            if key is None:
                missing.append(cands[-1])
                return np.zeros(leaf.shape, np.float32)
            used.add(key)
            value = _transform(path, state_dict[key], fc6_side)
            if tuple(value.shape) != tuple(leaf.shape):
                mismatched.append(
                    f"{key}: checkpoint {tuple(state_dict[key].shape)}, model expects {tuple(leaf.shape)} ({'/'.join(path)})"
                )
                return np.zeros(leaf.shape, np.float32)
            return value.astype(np.float32)

        return jax.tree_util.tree_map_with_path(one, template[collection])

    out = {c: fill(c) for c in template}
    unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIXES) and not ignore(k))
    problems = []
    if missing:
        problems.append(
            f"missing keys ({len(missing)}): " + ", ".join(missing[:40]) + (" ..." if len(missing) > 40 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected keys ({len(unexpected)}): "
            + ", ".join(unexpected[:40])
            + (" ..." if len(unexpected) > 40 else "")
        )
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched[:20]))
    if problems:
        raise ConversionError("state dict does not match the architecture:\n  " + "\n  ".join(problems))
    return out


# --- architectures ----------------------------------------------------------------------


def detect_arch(state_dict: dict[str, np.ndarray]) -> str | None:
    """Which of STATE_DICT_ARCHS a state dict looks like (by its key families), or None."""
    keys = list(state_dict)
    mask = any(k.startswith("roi_heads.mask_predictor.") for k in keys)
    if any(k.startswith("backbone.fpn.") for k in keys):
        return "maskrcnn_resnet50_fpn" if mask else "fasterrcnn_resnet50_fpn"
    if any(k.startswith("roi_heads.box_head.layer4.") for k in keys):
        return "maskrcnn_resnet50_c4" if mask else "fasterrcnn_resnet50_c4"
    if any(k.startswith("layer1.") for k in keys) and "conv1.weight" in state_dict:
        # the depths differ in layer3's block count: 6 (R-50), 23 (R-101)
        blocks = {int(k.split(".")[1]) for k in keys if k.startswith("layer3.") and k.split(".")[1].isdigit()}
        return {6: "resnet50", 23: "resnet101"}.get(len(blocks))
    return None


def check_arch(arch: str, state_dict: dict[str, np.ndarray]):
    found = detect_arch(state_dict)
    if found is not None and found != arch:
        raise ConversionError(
            f"--arch {arch} does not match the state dict, which looks like {found} "
            f"(keys such as {next(iter(state_dict))!r}); use --arch {found}"
        )


def infer_model_config(arch: str, state_dict: dict[str, np.ndarray], **overrides) -> ModelConfig:
    """ModelConfig for a detector state dict: the package's recipe (`modeling.config.r50_fpn` / `r50_c4`)
    with the class count and anchors read from its shapes.

    overrides: dotted ModelConfig fields ("backbone.bn_eps", "anchors.sizes"); None values are ignored.
    """
    check_arch(arch, state_dict)

    def shape(key):
        if key not in state_dict:
            raise ConversionError(
                f"{arch}: state dict has no {key!r}; is this a {arch} checkpoint? "
                f"(first keys: {', '.join(list(state_dict)[:5])})"
            )
        return state_dict[key].shape

    num_classes = shape("roi_heads.box_predictor.cls_score.weight")[0]
    num_anchors = shape("rpn.head.cls_logits.weight")[0]
    mask = arch in _MASK_ARCHS
    arch = _MASK_ARCHS.get(arch, arch)
    if arch == "fasterrcnn_resnet50_fpn":
        recipe = model_config.r50_fpn
        cfg = {"backbone.bn_eps": 0.0, "roi_heads.representation_size": shape("roi_heads.box_head.fc6.weight")[0]}
        if num_anchors != 3:
            raise ConversionError(
                f"rpn.head.cls_logits has {num_anchors} anchors per location; torchvision's FPN uses 3"
            )
    else:
        sizes = {15: (32.0, 64.0, 128.0, 256.0, 512.0), 9: (128.0, 256.0, 512.0)}
        if overrides.get("anchors.sizes") is None and num_anchors not in sizes:
            raise ConversionError(
                f"rpn.head.cls_logits has {num_anchors} anchors per location; pass --anchor-sizes "
                f"(3 aspect ratios x len(sizes) must equal {num_anchors})"
            )
        recipe = model_config.r50_c4
        cfg = {"anchors.sizes": sizes.get(num_anchors, ()), "backbone.bn_eps": 1e-5}
    if mask:
        fpn = arch == "fasterrcnn_resnet50_fpn"
        recipe = model_config.maskrcnn_r50_fpn if fpn else model_config.maskrcnn_r50_c4
        cfg.update(_mask_head_fields(arch, state_dict, shape, int(num_classes)))
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    model_cfg = recipe(num_classes=int(num_classes), **cfg)
    if model_cfg.num_anchors_per_location != num_anchors:
        raise ConversionError(
            f"anchor config gives {model_cfg.num_anchors_per_location} anchors per location, "
            f"the checkpoint's RPN head has {num_anchors}"
        )
    return model_cfg


def _mask_head_fields(arch: str, state_dict, shape, num_classes: int) -> dict[str, Any]:
    """The mask section's sizes read from a Mask R-CNN state dict (conv channels, predictor channels)."""
    logits = shape("roi_heads.mask_predictor.mask_fcn_logits.weight")
    if logits[0] != num_classes:
        raise ConversionError(
            f"roi_heads.mask_predictor.mask_fcn_logits has {logits[0]} classes, "
            f"roi_heads.box_predictor.cls_score {num_classes}"
        )
    fields: dict[str, Any] = {"mask.predictor_channels": int(shape("roi_heads.mask_predictor.conv5_mask.weight")[1])}
    if arch == "fasterrcnn_resnet50_fpn":
        channels = []
        for i in range(len(state_dict)):
            key = next(
                (k for k in (f"roi_heads.mask_head.{i}.0.weight", f"roi_heads.mask_head.mask_fcn{i + 1}.weight")
                 if k in state_dict), None,
            )  # fmt: skip
            if key is None:
                break
            channels.append(int(state_dict[key].shape[0]))
        fields["mask.conv_channels"] = tuple(channels)
    return fields


def check_shared_res5(state_dict: dict[str, np.ndarray]):
    """C4 Mask R-CNN: every `roi_heads.mask_head.*` must equal its `roi_heads.box_head.layer4.*` twin.

    Raises ConversionError naming the first key (in file order) without an equal twin.
    """
    mask_prefix, box_prefix = _C4_SHARED
    for key, value in state_dict.items():
        if not key.startswith(mask_prefix) or key.endswith(_IGNORED_SUFFIXES):
            continue
        twin = box_prefix + key[len(mask_prefix) :]
        if twin not in state_dict:
            raise ConversionError(
                f"{key} has no twin {twin}: the C4 mask head is the box head's res5 (the same parameters)"
            )
        if state_dict[twin].shape != value.shape or not np.array_equal(state_dict[twin], value):
            raise ConversionError(
                f"{key} differs from {twin}: the C4 mask head is the box head's res5 (the same parameters)"
            )


def convert_detector(state_dict, arch: str, **overrides) -> tuple[ModelConfig, dict]:
    """torchvision detector state dict -> (ModelConfig, variables)."""
    cfg = infer_model_config(arch, state_dict, **overrides)
    ignore = lambda k: False  # noqa: E731
    if arch == "maskrcnn_resnet50_c4":
        check_shared_res5(state_dict)
        ignore = lambda k: k.startswith(_C4_SHARED[0])  # noqa: E731
    template = jax.tree.map(np.asarray, init_variables(FasterRCNN(cfg), jax.random.key(0)))
    return cfg, convert_variables(state_dict, template, ignore=ignore, fc6_side=cfg.roi_heads.pooler.resolution)


def convert_resnet(state_dict, depth: int = 50) -> dict:
    """Plain torchvision ResNet state dict -> {"params", "frozen"} of the 4-stage trunk.

    The tree is the trunk's own (conv1, bn1, layer1..layer4); training places layer1-3
    (and layer4 for FPN) into `backbone/body` and, for C4, layer4 into
    `roi_heads/box_head/layer4`.
    """
    from frcnn_jax.modeling.resnet import ResNet

    trunk = ResNet(depth=depth, num_stages=4)
    template = jax.tree.map(np.asarray, jax.jit(trunk.init)(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
    return convert_variables(state_dict, template, ignore=lambda k: k.startswith("fc."))


def class_names_for(num_classes: int, names: str | None) -> list[str]:
    """Class names for a converted detector: index = label, 0 = background."""
    if names is None or names == "auto":
        if num_classes == 91:
            return list(COCO_CATEGORY_NAMES_91)
        return ["__background__"] + [f"class_{i}" for i in range(1, num_classes)]
    if names == "coco91":
        return list(COCO_CATEGORY_NAMES_91)
    path = pathlib.Path(names)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) == num_classes - 1:
        lines = ["__background__"] + lines
    if len(lines) != num_classes:
        raise ConversionError(
            f"{path}: {len(lines)} class names for a model with {num_classes} classes (incl. background)"
        )
    return lines


def convert(
    arch: str, checkpoint, out, *, bn_eps: float | None = None, anchor_sizes=None, class_names=None
) -> pathlib.Path:
    """Converts `checkpoint` (.pth) for `arch` and writes a model checkpoint to `out`."""
    if arch not in STATE_DICT_ARCHS:
        raise ConversionError(f"unknown --arch {arch!r}; choose one of {STATE_DICT_ARCHS}")
    sd = load_state_dict(checkpoint)
    meta: dict[str, Any] = {"source": f"torchvision {arch} state dict {pathlib.Path(checkpoint).name}", "arch": arch}
    if arch in RESNET_ARCHS:
        check_arch(arch, sd)
        depth = RESNET_ARCHS[arch]
        variables = convert_resnet(sd, depth)
        meta.update(kind="resnet_backbone", depth=depth, bn_eps=1e-5 if bn_eps is None else bn_eps)
        return ckpt.save_model(out, variables, None, meta)
    overrides = {"backbone.bn_eps": bn_eps}
    if anchor_sizes:
        overrides["anchors.sizes"] = tuple(anchor_sizes)
    cfg, variables = convert_detector(sd, arch, **overrides)
    names = class_names_for(cfg.num_classes, class_names)
    meta.update(kind="detector", class_names=names)
    if cfg.num_classes == 91 and (class_names in (None, "auto", "coco91")):
        meta["label_to_category_id"] = {str(i): i for i in range(1, 91) if names[i] != "N/A"}
    return ckpt.save_model(out, variables, cfg, meta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m frcnn_jax.convert",
        description="Convert a torchvision state dict (.pth) into a frcnn_jax model checkpoint.",
    )
    parser.add_argument("--arch", required=True, choices=STATE_DICT_ARCHS, help="architecture of the state dict")
    parser.add_argument("--checkpoint", required=True, help="torchvision .pth state dict")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument(
        "--bn-eps", type=float, default=None,
        help="frozen batch-norm eps (default: 0.0 for fasterrcnn_resnet50_fpn and maskrcnn_resnet50_fpn, as "
        "torchvision's COCO weights; 1e-5 otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--anchor-sizes", type=float, nargs="+", default=None,
        help="C4 anchor sizes (default from the RPN head: 15 anchors -> 32..512, 9 -> 128, 256, 512)",
    )  # fmt: skip
    parser.add_argument(
        "--class-names", default=None,
        help="'coco91' (default for 91-class models) or a text file with one class name per line",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.arch, args.checkpoint, args.out, bn_eps=args.bn_eps, anchor_sizes=args.anchor_sizes,
            class_names=args.class_names,
        )  # fmt: skip
    except (ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"error: converting needs torch: pip install -e '.[torch]' ({e})", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
