"""train.py / `train_and_evaluate`: outputs, exact resume, divergence, bad configs."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
from configs import default as default_config  # noqa: E402


def tiny_config():
    config = default_config.get_config()
    config.model.width = 8
    config.model.fpn_channels = 16
    config.model.representation_size = 32
    config.model.rpn_post_nms_top_n_train = 32
    config.model.box_batch_size_per_image = 16
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.data.shapes.num_val = 8
    config.optim.warmup_steps = 2
    config.optim.decay_steps = (4,)
    config.optim.total_steps = 6
    config.train.num_steps = 6
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.eval_every = 4
    config.train.visualize = 2
    return config


def _params(workdir):
    from frcnn_jax.training import checkpointing

    _, variables, _ = checkpointing.load_model_from_workdir(workdir)
    return variables["params"]


def test_train_outputs_and_exact_resume(tmp_path):
    from frcnn_jax.training.loop import train_and_evaluate

    config = tiny_config()
    full = train_and_evaluate(config, tmp_path / "a")
    assert set(full) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl", "per_class"}
    a = tmp_path / "a"
    assert json.loads((a / "eval_final.json").read_text())["AP"] == full["AP"]
    for name in ("loss_curve.png", "detections.png", "config.json"):
        assert (a / name).stat().st_size > 0
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "lr", "images_per_sec"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval/AP" in r] == [4, 6]  # periodic and final evaluation
    assert list((a / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (a / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]

    # Interrupted after 3 steps (checkpoint at 2 and at the stop), then the same call again.
    b = tmp_path / "b"
    assert train_and_evaluate(config, b, stop_after_steps=3) == {}
    assert not (b / "eval_final.json").exists()
    resumed = train_and_evaluate(config, b)
    for x, y in zip(jax.tree.leaves(_params(a)), jax.tree.leaves(_params(b))):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    assert resumed["AP"] == pytest.approx(full["AP"], abs=1e-6)
    losses_a = [r["loss"] for r in rows if "loss" in r]
    losses_b = [json.loads(line)["loss"] for line in (b / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    np.testing.assert_allclose(losses_b, losses_a, rtol=1e-6)

    # the Detector API reads a training work directory
    from frcnn_jax.data.shapes import ShapesDataset
    from frcnn_jax.detector import Detector

    det = Detector.from_checkpoint(b)
    assert det.class_names[1:] == ["circle", "square", "triangle", "diamond", "cross"] and det.min_size == 128
    out = det(ShapesDataset("val", num_images=1)[0]["image"])
    assert out["boxes"].shape[1] == 4

    # eval.py on the training work directory (its own config) reproduces the final AP
    r = subprocess.run([sys.executable, "eval.py", f"--checkpoint={b}", f"--out={tmp_path / 'ev'}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["AP"] == pytest.approx(full["AP"], abs=1e-6)


def test_non_finite_loss_stops_with_the_step_and_term(tmp_path):
    from frcnn_jax.training.loop import TrainingDiverged, train_and_evaluate

    config = tiny_config()
    config.optim.base_lr = 1e6
    config.optim.warmup_steps = 0
    config.optim.clip_grad_norm = 0.0
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step \d+: .*loss"):
        train_and_evaluate(config, tmp_path / "nan")
    # every checkpoint that was written holds finite parameters
    mngr = ocp.CheckpointManager((tmp_path / "nan" / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(read_only=True))
    for step in mngr.all_steps():
        _, variables, _ = __import__("frcnn_jax.training.checkpointing", fromlist=["x"]).load_model_from_workdir(tmp_path / "nan" / "checkpoints" / str(step))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables["params"]))


def test_bad_configs_fail_at_start(tmp_path):
    def run(*flags):
        return subprocess.run(
            [sys.executable, "train.py", f"--workdir={tmp_path / 'w'}", *flags], cwd=REPO, capture_output=True, text=True
        )

    r = run("--config.optim.base_lr=-0.1")
    assert r.returncode != 0 and "optim.base_lr=-0.1: must be > 0" in r.stderr
    r = run("--config.model.no_such_field=1")
    assert r.returncode != 0 and "no_such_field" in r.stderr
    r = run("--config.model.num_classes=3")
    assert r.returncode != 0 and "model.num_classes=3 but the shapes data has 5 classes" in r.stderr
    r = run("--config.data.batch_size=12")
    assert r.returncode != 0 and "divisible by the number of devices" in r.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_resume_with_other_anchors_is_refused(tmp_path):
    from frcnn_jax.training.loop import train_and_evaluate

    config = tiny_config()
    config.train.num_steps = 1
    config.train.visualize = 0
    train_and_evaluate(config, tmp_path / "w", stop_after_steps=1)
    config.model.aspect_ratios = (1.0,)
    with pytest.raises(ValueError, match="different model config.*aspect_ratios"):
        train_and_evaluate(config, tmp_path / "w")
