"""train.py as real runs use it: kill -9 at any moment, 2 processes, no per-step host sync, errors after the bar."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from frcnn_jax.modeling.faster_rcnn import ALL_LOSS_NAMES

# A Mask R-CNN (the tiny model + a tiny mask branch): what holds for it holds for the box model,
# whose training is the same code without the branch (the suite runs these once, on the mask model).
TRAIN = [sys.executable, "train.py", "--config=tests/tiny_config.py:mask"]
BOX_TRAIN = [sys.executable, "train.py", "--config=tests/tiny_config.py"]  # (boxes-only COCO JSON below)


def _flags(num_steps, **train):
    train = {"log_every": 1, "eval_every": 0, "visualize": 0, **train}
    return [f"--config.train.num_steps={num_steps}", *(f"--config.train.{k}={v}" for k, v in train.items())]


def _params(workdir):
    from frcnn_jax import run_checkpoint

    _, variables, _ = run_checkpoint.load_model(workdir)
    return jax.tree.leaves(variables)


def _loss_rows(workdir) -> list[dict]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _assert_same_run(workdir, reference, *, exact=True):
    for x, y in zip(_params(reference), _params(workdir), strict=True):
        if exact:
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
        else:
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    got, want = _loss_rows(workdir), _loss_rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]  # every step logged once
    assert all("loss_mask" in r for r in got + want)
    for name in ("loss", *ALL_LOSS_NAMES):
        a, b = [r[name] for r in got], [r[name] for r in want]
        if exact:
            assert a == b, name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)


def _run(args, timeout=1200, **kw):
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _orbax_tmp_dirs(workdir):
    ckpts = workdir / "checkpoints"
    return [p.name for p in ckpts.iterdir() if ".orbax-checkpoint-tmp" in p.name] if ckpts.is_dir() else []


def _wait_for(condition, proc, timeout=900, poll=0.01):
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not condition():
        time.sleep(poll)


def _rows_logged(workdir) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_same_command_resumes_exactly(tmp_path):
    flags = _flags(21, checkpoint_every=3) + ["--config.optim.decay_steps=(14,)"]
    reference = tmp_path / "reference"
    _run(TRAIN + flags + [f"--workdir={reference}"])

    work = tmp_path / "killed"
    command = TRAIN + flags + [f"--workdir={work}"]

    # A clean stop first: SIGTERM finishes the running step, checkpoints it and exits 143.
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _rows_logged(work) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    last_row = _loss_rows(work)[-1]["step"]
    assert f"stopped by SIGTERM after step {last_row}" in err
    assert max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == last_row

    # Then kill -9 at random moments of training, and while a checkpoint is being written.
    rng = random.Random(0)
    kills, kills_in_save = 0, 0
    for moment in ["random", "save", "random", "save (retry)"]:
        if moment == "save (retry)":
            if kills_in_save:
                break
            moment = "save"
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_rows = _rows_logged(work)
        if moment == "save":
            _wait_for(lambda: bool(_orbax_tmp_dirs(work)), proc, poll=0.001)  # a save is being written
        else:
            _wait_for(lambda start=start_rows: _rows_logged(work) >= start + 2, proc)
            time.sleep(rng.uniform(0.0, 0.4))  # some moment within the next steps
        if proc.poll() is not None:
            break  # it finished before the planned moment
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        kills_in_save += bool(_orbax_tmp_dirs(work))  # the dead process left a half-written step
    assert kills >= 3 and kills_in_save >= 1, (kills, kills_in_save)

    _run(command)  # the same command, once more: it resumes and finishes
    assert not _orbax_tmp_dirs(work)
    _assert_same_run(work, reference, exact=True)
    assert (
        json.loads((work / "eval_final.json").read_text())["AP"]
        == json.loads((reference / "eval_final.json").read_text())["AP"]
    )


def _detections_by_image(path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for d in json.loads(path.read_text()):
        out.setdefault(d["image_id"], []).append(d)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
    reference = tmp_path / "one"
    _run(TRAIN + _flags(6, checkpoint_every=2, visualize=2) + [f"--workdir={reference}"])

    work = tmp_path / "two"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for num_steps in (4, 6):  # the second command resumes the run from step 4, in 2 processes again
        port = _free_port()
        procs = [
            subprocess.Popen(
                TRAIN
                + _flags(num_steps, checkpoint_every=2, visualize=2)
                + [
                    f"--workdir={work}",
                    f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i in range(2)
        ]
        outs = [p.communicate(timeout=1200) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]

    _assert_same_run(work, reference, exact=False)
    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # process 0 alone writes: each row once
    final_two = json.loads((work / "eval_final.json").read_text())
    final_one = json.loads((reference / "eval_final.json").read_text())
    for key in ("AP", "AP50", "AP75", "AR100"):  # images split across the processes, then gathered
        assert final_two[key] == pytest.approx(final_one[key], abs=1e-6), key
    # (a model this young scores AP 0: the detections themselves show that every image was evaluated)
    dets_two, dets_one = (_detections_by_image(w / "eval_detections.json") for w in (work, reference))
    assert set(dets_one) == set(dets_two)
    assert {image_id % 2 for image_id in dets_two} == {0, 1}  # images of both processes (i on process i % 2)
    for image_id, ones in dets_one.items():
        twos = dets_two[image_id]
        assert len(twos) == len(ones)
        for a in twos:  # the same detection (up to float rounding) in the single-process run
            assert any(
                a["category_id"] == b["category_id"] and abs(a["score"] - b["score"]) < 1e-4
                and np.allclose(a["bbox"], b["bbox"], atol=1e-2) for b in ones
            ), (image_id, a)  # fmt: skip
    assert len(list((work / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per command, both process 0's
    data = sorted(p.name for p in (work / "checkpoints" / "6" / "data").iterdir() if p.suffix == ".json")
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not list(work.glob(".config.json.tmp*"))
    for name in ("config.json", "loss_curve.png", "detections.png"):
        assert (work / name).stat().st_size > 0


def _forbid_device_reads_under_the_guard(monkeypatch):
    """Makes `jax.transfer_guard_device_to_host("disallow")` bite on CPU too.

    On the CPU backend arrays already live in host memory and JAX's guard never fires, so
    inside a "disallow" region this also fails every read of a device value (`float`,
    `int`, `bool`, `jax.device_get`, `.tolist()`, `block_until_ready`): the syncs a training
    loop slips in by accident. On an accelerator JAX's own guard does this.
    """
    from jax._src import array as jax_array

    active = threading.local()
    real_guard = jax.transfer_guard_device_to_host

    @contextlib.contextmanager
    def guard(mode):
        with real_guard(mode):
            active.on = mode == "disallow"
            try:
                yield
            finally:
                active.on = False

    def forbid(original):
        def wrapper(self, *args, **kwargs):
            if getattr(active, "on", False):
                raise RuntimeError(
                    "Disallowed device-to-host transfer: a device value was read inside the guarded region"
                )
            return original(self, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(jax, "transfer_guard_device_to_host", guard)
    monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(forbid(jax_array.ArrayImpl._value.fget)))
    monkeypatch.setattr(jax_array.ArrayImpl, "block_until_ready", forbid(jax_array.ArrayImpl.block_until_ready))


def test_steps_between_fetches_make_no_host_transfer(tmp_path, monkeypatch):
    import tiny_config
    from frcnn_jax.training import loop

    _forbid_device_reads_under_the_guard(monkeypatch)
    config = tiny_config.get_config()
    config.train.update(
        num_steps=8, log_every=3, checkpoint_every=3, eval_every=0, visualize=0, transfer_guard="disallow"
    )
    assert loop.train_and_evaluate(config, tmp_path / "ok", stop_after_steps=6) == {}
    assert [r["step"] for r in _loss_rows(tmp_path / "ok")] == [3, 6]

    # The guard covers the per-step code: a sync slipped into it fails the run.
    real_advance = loop.Progress.advance

    def advance_and_sync(self, step):
        real_advance(self, step)
        float(jnp.ones(()) * step)

    monkeypatch.setattr(loop.Progress, "advance", advance_and_sync)
    with pytest.raises(Exception, match="Disallowed device-to-host transfer"):
        loop.train_and_evaluate(config, tmp_path / "sync", stop_after_steps=6)


def test_an_error_after_the_bar_started_prints_on_its_own_line(tmp_path):
    from PIL import Image

    from frcnn_jax.data.shapes import ShapesDataset

    source = ShapesDataset("train", num_images=16)
    images, annotations = tmp_path / "images", []
    images.mkdir()
    for i in range(len(source)):
        ex = source[i]
        Image.fromarray(ex["image"]).save(images / f"{i}.png")
        for k, (x1, y1, x2, y2) in enumerate(ex["boxes"].tolist()):
            annotations.append({"id": i * 100 + k, "image_id": i, "category_id": int(ex["labels"][k]),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})  # fmt: skip
    (images / "5.png").unlink()  # found missing only when training reads it
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 128, "width": 128} for i in range(len(source))],
        "annotations": annotations,
        "categories": [{"id": c, "name": n} for c, n in enumerate(source.category_names, start=1)],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    data = [f"--config.data.coco_json.{split}_{kind}={tmp_path / 'ann.json' if kind == 'annotations' else images}"
            for split in ("train", "val") for kind in ("annotations", "images")]  # fmt: skip
    r = subprocess.run(
        BOX_TRAIN + _flags(20) + ["--config.data.source=coco_json", *data, f"--workdir={tmp_path / 'w'}"],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 1
    assert "train:" in r.stderr  # the bar had started
    lines = r.stderr.replace("\r", "\n").rstrip("\n").split("\n")
    assert lines[-1].startswith("error: ") and "5.png" in lines[-1], r.stderr[-2000:]
    assert "\nerror: " in r.stderr  # on a line of its own, after the bar's last line
