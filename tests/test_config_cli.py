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
