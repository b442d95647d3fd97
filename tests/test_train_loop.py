"""train.py / `train_and_evaluate`: outputs, exact resume, divergence, bad configs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO
from frcnn_jax.modeling.faster_rcnn import LOSS_NAMES

sys.path.insert(0, str(REPO))
import tiny_config as tiny_config_lib  # noqa: E402


def tiny_config():
    return tiny_config_lib.get_config()


def _params(workdir):
    from frcnn_jax import run_checkpoint

    _, variables, _ = run_checkpoint.load_model(workdir)
    return variables["params"]


def test_train_outputs_and_exact_resume(tmp_path):
    from frcnn_jax.training.loop import train_and_evaluate

    config = tiny_config()
    full = train_and_evaluate(config, tmp_path / "a")
    assert set(full) >= {
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
        "per_class",
    }
    a = tmp_path / "a"
    assert json.loads((a / "eval_final.json").read_text())["AP"] == full["AP"]
    for name in ("loss_curve.png", "detections.png", "config.json"):
        assert (a / name).stat().st_size > 0
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {*LOSS_NAMES, "lr", "images_per_sec"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval/AP" in r] == [4, 6]  # periodic and final evaluation
    assert list((a / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (a / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]

    # Interrupted after 3 steps (checkpoint at 2 and at the stop), then the same call again;
    # with other prefetch and checkpoint settings, which must not change any number.
    config.train.prefetch = 3
    config.train.async_checkpoint = False
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
    r = subprocess.run(
        [sys.executable, "eval.py", f"--checkpoint={b}", f"--out={tmp_path / 'ev'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["AP"] == pytest.approx(full["AP"], abs=1e-6)


def test_non_finite_loss_stops_with_the_step_and_term(tmp_path):
    from frcnn_jax.training.loop import TrainingDiverged, train_and_evaluate

    config = tiny_config()
    config.optim.base_lr = 1e6
    config.optim.warmup_steps = 0
    config.optim.clip_grad_norm = 0.0
    config.train.log_every = 5  # metrics are fetched at step 5: the check at checkpoint steps must stop it first
    config.train.eval_every = 0
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step (\d+): .*loss") as e:
        train_and_evaluate(config, tmp_path / "nan")
    first_bad = int(re.search(r"step (\d+)", str(e.value)).group(1))
    assert first_bad <= 2  # lr 1e6 blows up at once; step 2 is a checkpoint step
    # every checkpoint that was written holds finite parameters
    from frcnn_jax import run_checkpoint

    steps = run_checkpoint.RunCheckpointer(tmp_path / "nan", read_only=True).all_steps()
    assert all(step < first_bad for step in steps), (steps, first_bad)
    for step in steps:
        _, variables, _ = run_checkpoint.load_model(tmp_path / "nan" / "checkpoints" / str(step))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables["params"]))


def test_bad_configs_fail_at_start(tmp_path):
    def run(*flags):
        return subprocess.run(
            [sys.executable, "train.py", f"--workdir={tmp_path / 'w'}", *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
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
    config.model.anchors.aspect_ratios = (1.0,)
    with pytest.raises(ValueError, match="different model config.*model.anchors.aspect_ratios"):
        train_and_evaluate(config, tmp_path / "w")
