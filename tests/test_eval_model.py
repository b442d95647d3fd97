"""eval.py model mode end to end: a converted torchvision checkpoint on real coco128 photos."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image

from conftest import REPO


def test_eval_converted_checkpoint_on_coco128(torch, shared, tmp_path):
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(0)
    model = tr.build_fpn(num_classes=91)
    t = torch.rand(1, 3, 800, 1088)
    tr.calibrate(model, t)
    torch.save(model.state_dict(), tmp_path / "fpn.pth")
    from frcnn_jax import convert

    ckpt = convert.convert("fasterrcnn_resnet50_fpn", tmp_path / "fpn.pth", tmp_path / "ckpt")
    root = shared / "data" / "coco128"
    out = tmp_path / "eval"
    r = subprocess.run(
        [
            sys.executable, "eval.py", "--config=configs/coco128_fpn.py", f"--checkpoint={ckpt}", f"--out={out}",
            "--max_images=4", f"--config.data.coco_json.val_annotations={root / 'annotations.json'}",
            f"--config.data.coco_json.val_images={root / 'images'}",
            f"--config.data.coco_json.train_annotations={root / 'annotations.json'}",
            f"--config.data.coco_json.train_images={root / 'images'}",
        ],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert list(metrics)[:12] == keys or set(keys) <= set(metrics)
    assert all(-1.0 <= metrics[k] <= 1.0 for k in keys)
    assert "person" in metrics["per_class"]
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["image_id"] for d in dets} <= {9, 25, 30, 34}
    ids = {c["id"] for c in json.loads((root / "annotations.json").read_text())["categories"]}
    assert {d["category_id"] for d in dets} <= ids  # original COCO category ids
    assert all(len(d["bbox"]) == 4 for d in dets)
    assert Image.open(out / "precision_recall.png").size[0] > 100

    r = subprocess.run(
        [sys.executable, "eval.py", f"--checkpoint={tmp_path / 'nope'}", f"--out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
