"""A typo'd --config.<field> override: one "error:" line naming the nearest field, exit status 2."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from frcnn_jax import config_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


def _nested():
    return ml_collections.ConfigDict(
        {"model": {"arch": "fpn", "rpn": {"nms_thresh": 0.7, "pre_nms_top_n": {"train": 2000}}}, "seed": 0}
    )


def test_nearest_dotted_path_in_nested_sections():
    cfg = _nested()
    assert config_cli.missing_path(cfg, "model.rpn.nms_tresh")
    assert not config_cli.missing_path(cfg, "model.rpn.pre_nms_top_n.train")
    assert not config_cli.missing_path(cfg, "model.arch.x")  # below a leaf: left to ml_collections
    assert config_cli.nearest_path(cfg, "model.rpn.nms_tresh") == "model.rpn.nms_thresh"
    assert config_cli.nearest_path(cfg, "model.rpn_nms_thresh") == "model.rpn.nms_thresh"
    assert config_cli.nearest_path(cfg, "model.rpn.pre_nms_top_n.trian") == "model.rpn.pre_nms_top_n.train"
    assert config_cli.nearest_path(cfg, "zzzzzz") is None


def test_message_uses_the_selected_config_file():
    argv = ["train.py", "--config=configs/shapes_c4.py", "--config.train.num_step=3", "--config.seed=1"]
    msg = config_cli.unknown_override_message([a.replace("configs/", f"{REPO}/configs/") for a in argv])
    assert msg == "--config.train.num_step: no such field; did you mean train.num_steps?"
    assert config_cli.unknown_override_message(["x", f"--config={REPO}/configs/default.py", "--config.seed=1"]) is None


@pytest.mark.parametrize(
    "cmd",
    [
        ["train.py", "--workdir=/tmp/frcnn-never-created", "--config.data.hflipp=False"],
        ["eval.py", "--config=configs/coco128_fpn.py", "--config.data.hflipp=False", "--checkpoint=x", "--out=y"],
    ],
)
def test_cli_typo_is_one_line_with_the_nearest_field(cmd):
    r = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: --config.data.hflipp: no such field; did you mean data.hflip?"], r.stderr
    assert "Traceback" not in r.stderr and not pathlib.Path("/tmp/frcnn-never-created").exists()


def test_suggestions_prefer_leaf_fields():
    argv = ["train.py", f"--config={REPO}/configs/default.py", "--config.optim.lr=0.1"]
    assert config_cli.unknown_override_message(argv) == "--config.optim.lr: no such field; did you mean optim.base_lr?"
    cfg = _nested()
    assert config_cli.leaf_paths(cfg) == ["model.arch", "model.rpn.nms_thresh", "model.rpn.pre_nms_top_n.train", "seed"]
    assert config_cli.nearest_path(cfg, "model.rpn.nms") == "model.rpn.nms_thresh"  # not the section model.rpn
    assert config_cli.nearest_path(cfg, "modle.arch") == "model.arch"


def _run(*cmd):
    return subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_print_config_shows_the_resolved_config_and_exits(tmp_path):
    r = _run("train.py", "--config=configs/shapes_c4.py", "--config.optim.base_lr=0.123", "--print_config")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "base_lr: 0.123" in r.stdout and "canvases:" in r.stdout and "num_steps:" in r.stdout
    r = _run("eval.py", "--config=tests/tiny_config.py", "--config.model.roi_heads.postprocess.score_thresh=0.0",
             "--print_config")  # fmt: skip
    assert r.returncode == 0 and "score_thresh: 0.0" in r.stdout, r.stderr[-2000:]


def test_train_one_line_errors_at_start(tmp_path):
    r = _run("train.py", "--config=tests/tiny_config.py")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: missing --workdir=DIR (where checkpoints and outputs go; see --help)"
    ], r.stderr
    r = _run("train.py", "--config=tests/tiny_config.py", f"--workdir={tmp_path / 'w'}", "--config.data.max_size=256")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: data.canvases=((128, 128),): no canvas holds a landscape image resized to (h, w)=(128, 256) "
        "(min_size 128, max_size 256); add a canvas of at least (128, 256) (data.min_size=(128,), "
        "data.test_min_size=128, data.max_size=256)"
    ], r.stderr
    # a Mask R-CNN on a source without masks: refused at start, naming the source
    r = _run("train.py", "--config=tests/tiny_config.py:mask", f"--workdir={tmp_path / 'w'}",
             "--config.data.source=tfds")  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: model.mask.enabled=True (Mask R-CNN) trains on instance masks, but the source tfds coco/2017 "
        "(data.source='tfds') carries none; use data.source=coco_json (COCO JSON segmentations), shapes, or a "
        "source with has_masks"
    ], r.stderr
    r = _run("train.py", "--config=tests/tiny_config.py:mask", f"--workdir={tmp_path / 'w'}",
             "--config.model.mask.conv_channels=(0,)")  # fmt: skip
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: model.mask.conv_channels="), (
        r.stderr
    )
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "w").exists()


def test_canvases_cover_the_resize_rule():
    from frcnn_jax.data import transforms

    transforms.check_canvases_cover([(800, 1344), (1344, 800)], (640, 800), 1333)
    transforms.check_canvases_cover([(128, 128)], 128, 128)
    transforms.check_canvases_cover([(608, 1024), (1024, 608)], 600, 1000)
    with pytest.raises(ValueError, match=r"portrait image resized to \(h, w\)=\(1333, 800\).*at least \(1344, 800\)"):
        transforms.check_canvases_cover([(800, 1344)], 800, 1333)
    with pytest.raises(ValueError, match=r"landscape image resized to \(h, w\)=\(800, 1333\)"):
        transforms.check_canvases_cover([(800, 1088), (1344, 800)], (600, 800), 1333)
    # the shape it names is reached: an image of that aspect ratio resizes to it
    assert transforms.resized_hw(1600, 2666, 800, 1333) == (800, 1333)


def test_eval_override_without_config_is_one_line(tmp_path):
    r = _run(
        "eval.py",
        f"--checkpoint={tmp_path}",
        f"--out={tmp_path / 'o'}",
        "--config.model.roi_heads.postprocess.nms_thresh=0.3",
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --config.model.roi_heads.postprocess.nms_thresh: a --config.* override needs --config=FILE (for a "
        "work directory's own config, use --score_thresh, --nms_thresh, --detections_per_img)"
    ], r.stderr
