"""`python -m frcnn_jax.predict` on real photos with a converted torchvision checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from conftest import REPO


def test_predict_cli_draws_and_writes_json(torch, shared, tmp_path):
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(0)
    model = tr.build_fpn(num_classes=91)
    # two landscape photos that pad to the same canvas: one compiled program
    images = [shared / "data" / "coco128" / "images" / n for n in ("000000000009.jpg", "000000000042.jpg")]
    t = torch.from_numpy(np.asarray(Image.open(images[0]).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    il, _ = model.transform([t])
    tr.calibrate(model, il.tensors)
    torch.save(model.state_dict(), tmp_path / "fpn.pth")
    ckpt = tmp_path / "ckpt"
    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.convert", "--arch", "fasterrcnn_resnet50_fpn", "--checkpoint", str(tmp_path / "fpn.pth"), "--out", str(ckpt)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.predict", "--checkpoint", str(ckpt), *map(str, images), "--out", str(out), "--score-thresh", "0.3"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for path in images:
        dets = json.loads((out / f"{path.stem}.json").read_text())
        assert dets, "calibrated random weights give detections above 0.3"
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True) and min(scores) > 0.3
        w, h = Image.open(path).size
        for d in dets:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w + 1e-3 and 0 <= y1 <= y2 <= h + 1e-3
            assert d["name"] not in ("__background__",) and isinstance(d["label"], int)
        png = Image.open(out / f"{path.stem}.png")
        assert png.size == (w, h)
        # something was drawn: the output differs from the photo
        assert (
            np.abs(
                np.asarray(png.convert("RGB"), np.int16) - np.asarray(Image.open(path).convert("RGB"), np.int16)
            ).max()
            > 50
        )

    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.predict", "--checkpoint", str(ckpt), str(tmp_path / "missing.jpg"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 1 and "missing.jpg: does not exist" in r.stderr and "Traceback" not in r.stderr
