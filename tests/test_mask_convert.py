"""torchvision Mask R-CNN state dicts -> model checkpoints: both FPN key layouts, the C4 shared res5, errors."""

from __future__ import annotations

import re

import numpy as np
import pytest

from frcnn_jax import convert
from frcnn_jax import model_checkpoint as checkpoint
from frcnn_jax.modeling import config as model_config


def _save(torch, sd: dict, path):
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    return path


@pytest.fixture(scope="module")
def fpn_sd(torch):
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(0)
    return {k: v.numpy() for k, v in tr.build_maskrcnn_fpn(num_classes=91).state_dict().items()}


@pytest.fixture(scope="module")
def c4_sd(torch):
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(1)
    return {k: v.numpy() for k, v in tr.build_maskrcnn_c4(num_classes=81).state_dict().items()}


def _check_fpn_mask(v, sd):
    p = v["params"]["roi_heads"]
    for i in range(4):
        np.testing.assert_array_equal(
            p["mask_head"][str(i)]["0"]["kernel"], sd[f"roi_heads.mask_head.{i}.0.weight"].transpose(2, 3, 1, 0)
        )
        np.testing.assert_array_equal(p["mask_head"][str(i)]["0"]["bias"], sd[f"roi_heads.mask_head.{i}.0.bias"])
    w = sd["roi_heads.mask_predictor.conv5_mask.weight"]  # ConvTranspose2d [in, out, kh, kw]
    np.testing.assert_array_equal(p["mask_predictor"]["conv5_mask"]["kernel"], w.transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(
        p["mask_predictor"]["mask_fcn_logits"]["kernel"],
        sd["roi_heads.mask_predictor.mask_fcn_logits.weight"].transpose(2, 3, 1, 0),
    )


def test_fpn_both_key_layouts(torch, fpn_sd, tmp_path):
    assert "roi_heads.mask_head.0.0.weight" in fpn_sd  # torchvision >= 0.13 layout
    out = convert.convert("maskrcnn_resnet50_fpn", _save(torch, fpn_sd, tmp_path / "new.pth"), tmp_path / "new")
    cfg, v, meta = checkpoint.load_model(out)
    assert cfg == model_config.maskrcnn_r50_fpn(num_classes=91, **{"backbone.bn_eps": 0.0})
    assert meta["arch"] == "maskrcnn_resnet50_fpn" and meta["class_names"][1] == "person"
    _check_fpn_mask(v, fpn_sd)
    from frcnn_jax.detector import Detector

    assert Detector.from_checkpoint(out).model_config.mask.enabled  # rebuilds the Mask R-CNN model
    # files written before torchvision 0.13: mask_head.mask_fcn{1..4}
    old = {re.sub(r"^roi_heads\.mask_head\.(\d)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.", k): a
           for k, a in fpn_sd.items()}  # fmt: skip
    assert "roi_heads.mask_head.mask_fcn4.bias" in old and "roi_heads.mask_head.0.0.bias" not in old
    out_old = convert.convert("maskrcnn_resnet50_fpn", _save(torch, old, tmp_path / "old.pth"), tmp_path / "old")
    cfg_old, v_old, _ = checkpoint.load_model(out_old)
    assert cfg_old == cfg
    _check_fpn_mask(v_old, fpn_sd)
    # a Faster R-CNN file is not a Mask R-CNN one, and the other way round
    with pytest.raises(convert.ConversionError, match="looks like maskrcnn_resnet50_fpn"):
        convert.convert("fasterrcnn_resnet50_fpn", tmp_path / "new.pth", tmp_path / "x")
    boxes_only = {k: a for k, a in fpn_sd.items() if not k.startswith("roi_heads.mask_")}
    with pytest.raises(convert.ConversionError, match="looks like fasterrcnn_resnet50_fpn"):
        convert.convert("maskrcnn_resnet50_fpn", _save(torch, boxes_only, tmp_path / "b.pth"), tmp_path / "x")


def test_fpn_missing_unexpected_mis_shaped(torch, fpn_sd, tmp_path):
    bad = dict(fpn_sd)
    del bad["roi_heads.mask_predictor.conv5_mask.bias"]
    bad["roi_heads.mask_predictor.extra.weight"] = np.zeros(3, np.float32)
    bad["roi_heads.mask_head.2.0.bias"] = np.zeros(7, np.float32)
    with pytest.raises(convert.ConversionError) as err:
        convert.convert("maskrcnn_resnet50_fpn", _save(torch, bad, tmp_path / "bad.pth"), tmp_path / "out")
    msg = str(err.value)
    assert "missing keys (1): roi_heads.mask_predictor.conv5_mask.bias" in msg
    assert "unexpected keys (1): roi_heads.mask_predictor.extra.weight" in msg
    assert "roi_heads.mask_head.2.0.bias: checkpoint (7,), model expects (256,)" in msg
    assert not (tmp_path / "out").exists()
    bad = dict(fpn_sd)
    bad["roi_heads.mask_predictor.mask_fcn_logits.weight"] = bad["roi_heads.mask_predictor.mask_fcn_logits.weight"][:5]
    with pytest.raises(convert.ConversionError, match="mask_fcn_logits has 5 classes, .*cls_score 91"):
        convert.convert("maskrcnn_resnet50_fpn", _save(torch, bad, tmp_path / "k.pth"), tmp_path / "out")


def test_c4_shared_res5(torch, c4_sd, tmp_path, capsys):
    # assembled from torchvision parts, the one res5 module is saved under both names
    assert "roi_heads.mask_head.0.conv1.weight" in c4_sd and "roi_heads.box_head.layer4.0.conv1.weight" in c4_sd
    out = convert.convert("maskrcnn_resnet50_c4", _save(torch, c4_sd, tmp_path / "c4.pth"), tmp_path / "c4")
    cfg, v, _ = checkpoint.load_model(out)
    assert cfg == model_config.maskrcnn_r50_c4(num_classes=81, **{"backbone.bn_eps": 1e-5})
    p = v["params"]["roi_heads"]
    assert sorted(p) == ["box_head", "box_predictor", "mask_predictor"]  # no copy of res5
    np.testing.assert_array_equal(
        p["mask_predictor"]["conv5_mask"]["kernel"],
        c4_sd["roi_heads.mask_predictor.conv5_mask.weight"].transpose(2, 3, 0, 1),
    )
    # without the duplicate (the C4 box keys plus roi_heads.mask_predictor.*): the same model
    lean = {k: a for k, a in c4_sd.items() if not k.startswith("roi_heads.mask_head.")}
    cfg2, v2, _ = checkpoint.load_model(
        convert.convert("maskrcnn_resnet50_c4", _save(torch, lean, tmp_path / "lean.pth"), tmp_path / "lean")
    )
    assert cfg2 == cfg
    np.testing.assert_array_equal(
        v2["params"]["roi_heads"]["box_head"]["layer4"]["2"]["conv3"]["kernel"],
        v["params"]["roi_heads"]["box_head"]["layer4"]["2"]["conv3"]["kernel"],
    )
    # a mask head that is not the box head's res5 is refused in one line naming the first differing key
    bad = dict(c4_sd)
    for key in ("roi_heads.mask_head.1.bn2.running_var", "roi_heads.mask_head.2.conv1.weight"):
        bad[key] = bad[key] + 1.0
    _save(torch, bad, tmp_path / "bad.pth")
    assert convert.main(["--arch", "maskrcnn_resnet50_c4", "--checkpoint", str(tmp_path / "bad.pth"),
                         "--out", str(tmp_path / "bad")]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: roi_heads.mask_head.1.bn2.running_var differs from roi_heads.box_head.layer4.1.bn2.running_var: "
        "the C4 mask head is the box head's res5 (the same parameters)"
    ]
    assert not (tmp_path / "bad").exists()
    odd = dict(c4_sd)
    odd["roi_heads.mask_head.9.conv1.weight"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError, match=r"roi_heads.mask_head.9.conv1.weight has no twin"):
        convert.convert("maskrcnn_resnet50_c4", _save(torch, odd, tmp_path / "odd.pth"), tmp_path / "odd")
    # missing / mis-shaped predictor keys: the usual listing
    bad = dict(lean)
    del bad["roi_heads.mask_predictor.mask_fcn_logits.bias"]
    bad["roi_heads.mask_predictor.conv5_mask.bias"] = np.zeros(3, np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.convert("maskrcnn_resnet50_c4", _save(torch, bad, tmp_path / "m.pth"), tmp_path / "m")
    assert "missing keys (1): roi_heads.mask_predictor.mask_fcn_logits.bias" in str(e.value)
    assert "roi_heads.mask_predictor.conv5_mask.bias: checkpoint (3,), model expects (256,)" in str(e.value)
    with pytest.raises(convert.ConversionError, match="looks like maskrcnn_resnet50_c4"):
        convert.convert("fasterrcnn_resnet50_c4", tmp_path / "c4.pth", tmp_path / "x")
