"""`train.init_checkpoint` and `train.freeze`: fine-tuning from a converted detector or a run.

The R-50-FPN test is torchvision's fine-tuning tutorial at a small canvas: a converted
torchvision model (calibrated random weights, 91 classes) trained on coco128 as a
4-object-class dataset. The work-directory start, freezing, resume and the errors use
the tiny R-18-FPN on shapes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from frcnn_jax import run_checkpoint
from frcnn_jax.modeling import param_paths

sys.path.insert(0, str(REPO))
import tiny_config as tiny_config_lib  # noqa: E402

LOOP_LOG = "frcnn_jax.training.loop"


def _flat(tree) -> dict[str, np.ndarray]:
    return {"/".join(p): np.asarray(x) for p, x in param_paths.flat_paths(tree).items()}


def _log_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOOP_LOG and "train.init_checkpoint" in r.getMessage()]


def _losses(workdir) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# --- the pure merge ------------------------------------------------------------------------


def _tree(num_classes=5, fc=8):
    z = np.zeros
    return {
        "params": {
            "backbone": {"conv": {"kernel": z((3, 3, 3, 4), np.float32)}},
            "roi_heads": {
                "box_head": {"fc6": {"kernel": z((16, fc), np.float32)}},
                "box_predictor": {
                    "cls_score": {"kernel": z((fc, num_classes), np.float32), "bias": z((num_classes,), np.float32)},
                    "bbox_pred": {"kernel": z((fc, 4 * num_classes), np.float32)},
                },
            },
        },
        "frozen": {"backbone": {"bn": {"running_mean": z((4,), np.float32)}}},
    }


def test_merge_loads_matching_and_reinitialises_the_class_layers():
    rng = np.random.default_rng(0)
    source = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), _tree(num_classes=91))
    fresh = jax.tree.map(lambda x: x + 7.0, _tree(num_classes=5))
    out, report = param_paths.with_checkpoint_weights(fresh, source, reinit_class_dependent=True)
    got, src, new = _flat(out["params"]), _flat(source["params"]), _flat(fresh["params"])
    for path in ("backbone/conv/kernel", "roi_heads/box_head/fc6/kernel"):
        np.testing.assert_array_equal(got[path], src[path])
    for path in ("roi_heads/box_predictor/cls_score/kernel", "roi_heads/box_predictor/bbox_pred/kernel"):
        np.testing.assert_array_equal(got[path], new[path])  # the fresh values, with the new shape
    np.testing.assert_array_equal(
        out["frozen"]["backbone"]["bn"]["running_mean"], source["frozen"]["backbone"]["bn"]["running_mean"]
    )
    assert report["loaded"] == {"params": 2, "frozen": 1}
    assert report["reinitialised"] == [
        ("roi_heads/box_predictor/bbox_pred/kernel", (8, 364), (8, 20)),
        ("roi_heads/box_predictor/cls_score/bias", (91,), (5,)),
        ("roi_heads/box_predictor/cls_score/kernel", (8, 91), (8, 5)),
    ]
    # the same class count: the predictor loads too
    out, report = param_paths.with_checkpoint_weights(_tree(91), source, reinit_class_dependent=False)
    assert report["reinitialised"] == [] and report["loaded"] == {"params": 5, "frozen": 1}


def test_merge_errors_name_the_parameters():
    src = _tree(num_classes=5)
    with pytest.raises(
        param_paths.ParamMismatch,
        match=r"roi_heads/box_head/fc6/kernel: checkpoint shape \(16, 8\), model shape \(16, 12\)",
    ):
        param_paths.with_checkpoint_weights(_tree(5, fc=12), src, reinit_class_dependent=True)
    # a different class count is only allowed where the table says so
    with pytest.raises(
        param_paths.ParamMismatch, match=r"cls_score/kernel: checkpoint shape \(8, 5\), model shape \(8, 7\)"
    ):
        param_paths.with_checkpoint_weights(_tree(7), src, reinit_class_dependent=False)
    extra = _tree(5)
    extra["params"]["rpn"] = {"conv": {"bias": np.zeros(4, np.float32)}}
    with pytest.raises(param_paths.ParamMismatch, match=r"rpn/conv/bias \(4,\) is missing from the checkpoint"):
        param_paths.with_checkpoint_weights(extra, src, reinit_class_dependent=False)
    with pytest.raises(
        param_paths.ParamMismatch, match=r"rpn/conv/bias \(4,\) is in the checkpoint but not in the model"
    ):
        param_paths.with_checkpoint_weights(src, extra, reinit_class_dependent=False)


# --- a run's work directory (tiny R-18-FPN on shapes) -----------------------------------------


def tiny_config(**train):
    config = tiny_config_lib.get_config()
    # stop_after_steps < num_steps: no final evaluation (not the point here)
    config.train.update(num_steps=20, eval_every=0, visualize=0, checkpoint_every=2, **train)
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from frcnn_jax.training.loop import train_and_evaluate

    workdir = tmp_path_factory.mktemp("tiny") / "a"
    train_and_evaluate(tiny_config(), workdir, stop_after_steps=2)
    return workdir


def test_workdir_start_freeze_and_resume(tiny_run, tmp_path, caplog):
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN
    from frcnn_jax.training.loop import _init_variables, train_and_evaluate

    _, source, _ = run_checkpoint.load_model(tiny_run)
    config = tiny_config(init_checkpoint=str(tiny_run), freeze="backbone/|rpn/head/conv/")
    # every array is the run's (same class count: nothing re-initialised)
    init = _init_variables(FasterRCNN(ModelConfig.from_dict(config.model.to_dict())), config, config.seed)
    for coll in ("params", "frozen"):
        a, b = _flat(init[coll]), _flat(source[coll])
        assert a.keys() == b.keys()
        for path in a:
            np.testing.assert_array_equal(a[path], b[path], err_msg=path)

    caplog.set_level(logging.INFO, logger=LOOP_LOG)
    b = tmp_path / "b"
    train_and_evaluate(config, b, stop_after_steps=2)
    lines = _log_lines(caplog)
    assert lines[0].startswith(f"train.init_checkpoint: loaded {len(jax.tree.leaves(source))} arrays from {tiny_run}")
    assert lines[1] == "train.init_checkpoint: re-initialised 0 arrays (model.num_classes=6 as in the checkpoint)"
    trained = run_checkpoint.load_model(b)[1]
    frozen_paths = [p for p in _flat(source["params"]) if p.startswith("backbone/") or p.startswith("rpn/head/conv/")]
    assert len(frozen_paths) > 30
    got, src = _flat(trained["params"]), _flat(source["params"])
    for path in frozen_paths:  # bitwise: frozen parameters get no update at all
        assert got[path].tobytes() == src[path].tobytes(), path
    moved = [p for p in got if p not in frozen_paths and not np.array_equal(got[p], src[p])]
    assert {p.split("/")[0] for p in moved} == {"rpn", "roi_heads"}

    # a rerun of the same command resumes (the init is not applied again) and continues as an
    # uninterrupted run from the same start
    caplog.clear()
    train_and_evaluate(config, b, stop_after_steps=2)
    assert _log_lines(caplog) == []
    assert any("resumed from step 2" in r.getMessage() for r in caplog.records)
    c = tmp_path / "c"
    train_and_evaluate(config, c, stop_after_steps=4)
    for x, y in zip(jax.tree.leaves(run_checkpoint.load_model(c)[1]), jax.tree.leaves(run_checkpoint.load_model(b)[1])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(_losses(b), _losses(c), rtol=1e-6)

    # another freeze setting cannot resume the run (its optimiser state has another structure)
    with pytest.raises(ValueError, match="train.freeze: saved 'backbone/|rpn/head/conv/', now 'backbone/'"):
        train_and_evaluate(tiny_config(init_checkpoint=str(tiny_run), freeze="backbone/"), b, stop_after_steps=1)


def test_bad_settings_are_one_error_line(tiny_run, tmp_path):
    from frcnn_jax.training.loop import train_and_evaluate, validate_config

    with pytest.raises(ValueError, match=r"train.freeze='\(bad': not a regular expression"):
        validate_config(tiny_config(freeze="(bad"))
    with pytest.raises(ValueError, match="train.freeze='backbone/body/nope': matches no parameter path"):
        train_and_evaluate(tiny_config(freeze="backbone/body/nope"), tmp_path / "x", stop_after_steps=1)
    with pytest.raises(ValueError, match="set one"):
        validate_config(tiny_config(init_checkpoint=str(tiny_run), init_backbone=str(tiny_run)))
    with pytest.raises(ValueError, match=r"train.init_checkpoint='.*nope': checkpoint .*nope does not exist"):
        train_and_evaluate(tiny_config(init_checkpoint=str(tmp_path / "nope")), tmp_path / "y", stop_after_steps=1)
    config = tiny_config(init_checkpoint=str(tiny_run))
    config.model.arch = "c4"
    with pytest.raises(
        ValueError, match="an architecture mismatch: the checkpoint's model.arch='fpn', the config's 'c4'"
    ):
        train_and_evaluate(config, tmp_path / "z", stop_after_steps=1)

    # train.py: a shape mismatch is one line naming the parameter
    r = subprocess.run(
        [
            sys.executable, "train.py", "--config=tests/tiny_config.py", f"--workdir={tmp_path / 'w'}",
            f"--config.train.init_checkpoint={tiny_run}", "--config.model.backbone.fpn_channels=8",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"error: train.init_checkpoint='{tiny_run}': " in errors[0]
    assert "backbone/fpn/inner_blocks_0/bias: checkpoint shape (16,), model shape (8,)" in errors[0]


# --- torchvision's tutorial: a converted R-50-FPN fine-tuned on coco128 as 4 classes -----------

CLASSES = {1: "person", 3: "car", 47: "cup", 51: "bowl"}  # coco128 category ids kept


@pytest.fixture(scope="module")
def converted_fpn(torch, shared, tmp_path_factory):
    from frcnn_jax import convert
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(0)
    model = tr.build_fpn(num_classes=91, min_size=256, max_size=320)  # the transform's sizes: calibration only
    photo = np.asarray(Image.open(shared / "data/coco128/images/000000000009.jpg").convert("RGB"))
    il, _ = model.transform([torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255])
    tr.calibrate(model, il.tensors)  # frozen batch norms calibrated on a normalised photo
    d = tmp_path_factory.mktemp("fpn")
    torch.save(model.state_dict(), d / "fpn.pth")
    return convert.convert("fasterrcnn_resnet50_fpn", d / "fpn.pth", d / "ckpt")


@pytest.fixture(scope="module")
def coco4(shared, tmp_path_factory):
    """coco128 restricted to 4 categories and 2 images that hold them: a COCO JSON file.

    With batch 2 every step sees the same two photos, so the losses fall within a few steps.
    """
    doc = json.loads((shared / "data/coco128/annotations.json").read_text())
    anns = [a for a in doc["annotations"] if a["category_id"] in CLASSES and not a.get("iscrowd", 0)]
    by_image: dict[int, set] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], set()).add(a["category_id"])
    # images with the most of the 4 classes first, then by id
    keep = sorted(by_image, key=lambda i: (-len(by_image[i]), i))[:2]
    out = {
        "images": [im for im in doc["images"] if im["id"] in keep],
        "annotations": [a for a in anns if a["image_id"] in keep],
        "categories": [c for c in doc["categories"] if c["id"] in CLASSES],
    }
    path = tmp_path_factory.mktemp("coco4") / "annotations.json"
    path.write_text(json.dumps(out))
    return path, shared / "data/coco128/images"


def finetune_flags(ckpt, annotations, images) -> list[str]:
    """train.py's flags for the tutorial's run at a small canvas (the README's command, smaller)."""
    return [
        "--config=configs/coco128_fpn.py",
        f"--config.train.init_checkpoint={ckpt}",
        "--config.model.num_classes=5",
        "--config.model.backbone.bn_eps=0.0",  # as the converted torchvision weights run
        f"--config.data.coco_json.train_annotations={annotations}",
        f"--config.data.coco_json.train_images={images}",
        f"--config.data.coco_json.val_annotations={annotations}",
        f"--config.data.coco_json.val_images={images}",
        # small: 256 px short side in one 320x320 canvas, 8 steps of the same 2 images, LR 0.002
        # (the tutorial's 0.005 makes 8 steps from these random-weight detectors spike)
        "--config.data.min_size=(256,)", "--config.data.test_min_size=256", "--config.data.max_size=320",
        "--config.data.canvases=((320, 320),)", "--config.data.hflip=False",
        "--config.optim.base_lr=0.002", "--config.optim.warmup_steps=0", "--config.optim.decay_steps=(1000,)",
        "--config.train.num_steps=8", "--config.train.log_every=1", "--config.train.eval_max_images=2",
        "--config.train.visualize=0", "--config.train.xla_cpu_scheduler=default",
    ]  # fmt: skip


def test_finetune_converted_fpn_on_coco128_with_4_classes(converted_fpn, coco4, tmp_path):
    """train.py from a converted 91-class detector on a 4-class COCO JSON (one device: batch 2)."""
    from frcnn_jax import model_checkpoint

    _, source, _ = model_checkpoint.load_model(converted_fpn)
    workdir = tmp_path / "ft"
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user runs it
    r = subprocess.run(
        [sys.executable, "train.py", f"--workdir={workdir}", *finetune_flags(converted_fpn, *coco4)],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [
        line[line.index("train.init_checkpoint:") :]
        for line in r.stderr.splitlines()
        if "] train.init_checkpoint:" in line
    ]
    for line in lines:
        print(line)
    n_params, n_frozen = (len(jax.tree.leaves(source[c])) for c in ("params", "frozen"))
    assert lines[0] == (
        f"train.init_checkpoint: loaded {n_params - 4 + n_frozen} arrays from {converted_fpn} (torchvision "
        f"fasterrcnn_resnet50_fpn state dict fpn.pth): {n_params - 4} parameters, {n_frozen} frozen batch-norm statistics"
    )
    assert lines[1] == (
        "train.init_checkpoint: re-initialised 4 class-dependent arrays (model.num_classes 91 in the checkpoint, "
        "5 now): roi_heads/box_predictor/bbox_pred/bias (364,) -> (20,); roi_heads/box_predictor/bbox_pred/kernel "
        "(1024, 364) -> (1024, 20); roi_heads/box_predictor/cls_score/bias (91,) -> (5,); "
        "roi_heads/box_predictor/cls_score/kernel (1024, 91) -> (1024, 5)"
    )
    cfg, trained, meta = run_checkpoint.load_model(workdir)
    assert cfg.num_classes == 5 and meta["class_names"] == ["__background__", *CLASSES.values()]
    pred = trained["params"]["roi_heads"]["box_predictor"]
    assert pred["cls_score"]["kernel"].shape == (1024, 5) and pred["bbox_pred"]["kernel"].shape == (1024, 20)
    assert set(json.loads((workdir / "eval_final.json").read_text())["per_class"]) <= set(CLASSES.values())

    # What the run started from: the frozen batch-norm statistics and the stages
    # model.backbone.freeze_at=2 freezes (stem, layer1) never train, so the trained checkpoint
    # still holds the converted ones bitwise (every other array: the next test).
    got, src = _flat(trained["frozen"]), _flat(source["frozen"])
    assert got.keys() == src.keys()
    for path in src:
        assert got[path].tobytes() == src[path].tobytes(), path
    got, src = _flat(trained["params"]), _flat(source["params"])
    stem = [p for p in src if p.startswith(("backbone/body/conv1/", "backbone/body/bn1/", "backbone/body/layer1/"))]
    assert len(stem) > 10
    for path in stem:
        assert got[path].tobytes() == src[path].tobytes(), path

    losses = _losses(workdir)
    print("losses:", " ".join(f"{x:.4f}" for x in losses))
    assert len(losses) == 8 and np.all(np.isfinite(losses))
    # Each step samples its anchors and ROIs anew, so single losses are noisy: the median of
    # the last 4 against the first step's (the converted weights'). At the tutorial's LR 0.005
    # the 8 steps spiked (3.81 ... 2.49 3.66; with other float rounding 3.51 5.10 2.39) and
    # failed the earlier bound (mean of the last 3 < 0.85 x the first 3) on one machine and
    # not another; at 0.002 they fall smoothly, 3.81 -> 1.73 (median of the last 4: 0.52x).
    assert np.median(losses[-4:]) < 0.7 * losses[0], losses


def test_init_matches_the_converted_checkpoint(converted_fpn):
    """The loop's initialisation: every array but the class-dependent ones equals the checkpoint's."""
    from frcnn_jax import model_checkpoint
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN
    from frcnn_jax.training.loop import _init_variables

    sys.path.insert(0, str(REPO))
    from configs import coco128_fpn

    _, source, _ = model_checkpoint.load_model(converted_fpn)
    config = coco128_fpn.get_config()
    config.model.num_classes = 5
    config.model.backbone.bn_eps = 0.0
    config.train.init_checkpoint = str(converted_fpn)
    init = _init_variables(FasterRCNN(ModelConfig.from_dict(config.model.to_dict())), config, config.seed)
    for coll in ("params", "frozen"):
        a, b = _flat(init[coll]), _flat(source[coll])
        assert a.keys() == b.keys()
        for path in a:
            if param_paths.is_class_dependent(tuple(path.split("/"))):
                assert a[path].shape != b[path].shape
            else:
                np.testing.assert_array_equal(a[path], b[path], err_msg=path)
