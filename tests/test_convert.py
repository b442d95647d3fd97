"""torchvision state dict -> model checkpoint: layouts, errors, CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from frcnn_jax import convert
from frcnn_jax import model_checkpoint as checkpoint
from frcnn_jax.modeling import config as model_config


@pytest.fixture(scope="module")
def fpn_state_dict(torch, tmp_path_factory):
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(0)
    sd = tr.build_fpn(num_classes=91).state_dict()
    path = tmp_path_factory.mktemp("fpn") / "fpn.pth"
    torch.save(sd, path)
    return path, {k: v.numpy() for k, v in sd.items()}


def test_fpn_conversion_layouts(fpn_state_dict, tmp_path):
    path, sd = fpn_state_dict
    out = convert.convert("fasterrcnn_resnet50_fpn", path, tmp_path / "ck")
    cfg, v, meta = checkpoint.load_model(out)
    assert cfg.arch == "fpn" and cfg.num_classes == 91 and cfg.backbone.bn_eps == 0.0
    assert cfg == model_config.r50_fpn(num_classes=91, **{"backbone.bn_eps": 0.0})  # the package's one recipe
    assert meta["class_names"][1] == "person" and meta["label_to_category_id"]["1"] == 1
    p, f = v["params"], v["frozen"]
    np.testing.assert_array_equal(
        p["backbone"]["body"]["conv1"]["kernel"], sd["backbone.body.conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        f["backbone"]["body"]["layer2"]["0"]["downsample_1"]["running_var"],
        sd["backbone.body.layer2.0.downsample.1.running_var"],
    )
    np.testing.assert_array_equal(p["rpn"]["head"]["conv"]["bias"], sd["rpn.head.conv.0.0.bias"])
    np.testing.assert_array_equal(
        p["backbone"]["fpn"]["inner_blocks_3"]["bias"], sd["backbone.fpn.inner_blocks.3.0.bias"]
    )
    np.testing.assert_array_equal(
        p["roi_heads"]["box_predictor"]["bbox_pred"]["kernel"], sd["roi_heads.box_predictor.bbox_pred.weight"].T
    )
    # fc6 columns: torchvision flattens (c, y, x), we flatten (y, x, c)
    w = sd["roi_heads.box_head.fc6.weight"]  # [1024, 256 * 7 * 7]
    ours = p["roi_heads"]["box_head"]["fc6"]["kernel"]  # [7 * 7 * 256, 1024]
    c, y, x = 5, 2, 3
    np.testing.assert_array_equal(ours[(y * 7 + x) * 256 + c], w[:, c * 49 + y * 7 + x])


def test_errors_name_the_keys(fpn_state_dict, tmp_path, torch):
    path, sd = fpn_state_dict
    # an FPN state dict is not a C4 one, nor a plain ResNet
    with pytest.raises(convert.ConversionError, match="looks like fasterrcnn_resnet50_fpn"):
        convert.convert("fasterrcnn_resnet50_c4", path, tmp_path / "c4")
    with pytest.raises(convert.ConversionError, match="looks like fasterrcnn_resnet50_fpn"):
        convert.convert("resnet50", path, tmp_path / "r50")
    bad = dict(sd)
    del bad["backbone.body.layer1.0.conv2.weight"]
    bad["extra.weight"] = np.zeros(3, np.float32)
    bad["rpn.head.bbox_pred.bias"] = np.zeros(5, np.float32)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in bad.items()}, tmp_path / "bad.pth")
    with pytest.raises(convert.ConversionError) as err:
        convert.convert("fasterrcnn_resnet50_fpn", tmp_path / "bad.pth", tmp_path / "out")
    msg = str(err.value)
    assert "backbone.body.layer1.0.conv2.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "rpn.head.bbox_pred.bias: checkpoint (5,), model expects (12,)" in msg
    assert not (tmp_path / "out").exists()


def test_resnet50_backbone_conversion(torch, torchvision, tmp_path):
    sd = torchvision.models.resnet50().state_dict()
    torch.save(sd, tmp_path / "r50.pth")
    out = convert.convert("resnet50", tmp_path / "r50.pth", tmp_path / "r50")
    cfg, v, meta = checkpoint.load_model(out)
    assert cfg is None and meta["kind"] == "resnet_backbone"
    np.testing.assert_array_equal(
        v["params"]["layer4"]["2"]["conv3"]["kernel"], sd["layer4.2.conv3.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(v["frozen"]["bn1"]["running_mean"], sd["bn1.running_mean"].numpy())

    # ... and initialises a C4 detector for training: layer1-3 in the trunk, layer4 as the box head
    import sys

    from conftest import REPO
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN
    from frcnn_jax.training.loop import _init_variables

    sys.path.insert(0, str(REPO))
    from configs import r50_c4_coco

    config = r50_c4_coco.get_config()
    config.train.init_backbone = str(out)
    model = FasterRCNN(ModelConfig.from_dict(config.model.to_dict()))
    init = _init_variables(model, config, 0)
    np.testing.assert_array_equal(
        init["params"]["backbone"]["body"]["layer3"]["5"]["conv2"]["kernel"],
        v["params"]["layer3"]["5"]["conv2"]["kernel"],
    )
    np.testing.assert_array_equal(
        init["params"]["roi_heads"]["box_head"]["layer4"]["0"]["downsample_0"]["kernel"],
        v["params"]["layer4"]["0"]["downsample_0"]["kernel"],
    )
    np.testing.assert_array_equal(
        init["frozen"]["roi_heads"]["box_head"]["layer4"]["1"]["bn2"]["running_var"],
        v["frozen"]["layer4"]["1"]["bn2"]["running_var"],
    )
    np.testing.assert_array_equal(
        init["frozen"]["backbone"]["body"]["bn1"]["running_mean"], v["frozen"]["bn1"]["running_mean"]
    )
    config.model.backbone.depth = 101
    with pytest.raises(ValueError, match="ResNet-50 checkpoint cannot initialise model.backbone.depth=101"):
        _init_variables(FasterRCNN(ModelConfig.from_dict(config.model.to_dict())), config, 0)


def test_cli(torch, tmp_path):
    env_py = [sys.executable, "-m", "frcnn_jax.convert"]
    r = subprocess.run(env_py + ["--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--arch" in r.stdout and "fasterrcnn_resnet50_c4" in r.stdout
    r = subprocess.run(env_py + ["--arch", "resnet50", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "nope.pth does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    r = subprocess.run(env_py + ["--arch", "resnet50", "--checkpoint", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "junk.pth: cannot be read" in r.stderr and "Traceback" not in r.stderr
    torch.save({"a": [1, 2]}, tmp_path / "notsd.pth")
    r = subprocess.run(env_py + ["--arch", "resnet50", "--checkpoint", str(tmp_path / "notsd.pth"), "--out", str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "expected a state dict" in r.stderr


def test_legacy_pickle_is_refused_in_one_line(torch, tmp_path):
    """A raw pickle (a whole module) is never unpickled; the error says so and how to re-save it."""
    torch.save(torch.nn.Linear(2, 3), tmp_path / "legacy.pth")
    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.convert", "--arch=resnet50", f"--checkpoint={tmp_path / 'legacy.pth'}",
         f"--out={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'legacy.pth'}: not a weights-only state dict (it pickles the Python object "
        "torch.nn.modules.linear.Linear); re-save its weights where it was written: torch.save(model.state_dict(), path)"
    ]
    assert not (tmp_path / "out").exists()


def test_resnet101_backbone_conversion(torch, torchvision, tmp_path):
    """`--arch resnet101`: an ImageNet R-101 for train.init_backbone (the CLI, as documented)."""
    import jax

    from frcnn_jax.modeling import param_paths
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
    from frcnn_jax.training.loop import _init_variables

    torch.manual_seed(0)
    sd = torchvision.models.resnet101().state_dict()
    torch.save(sd, tmp_path / "r101.pth")
    # the depth is told apart from the keys: an R-101 is not converted as an R-50
    with pytest.raises(convert.ConversionError, match="looks like resnet101.*use --arch resnet101"):
        convert.convert("resnet50", tmp_path / "r101.pth", tmp_path / "wrong")
    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.convert", "--arch", "resnet101", "--checkpoint", str(tmp_path / "r101.pth"),
         "--out", str(tmp_path / "r101")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    cfg, v, meta = checkpoint.load_model(tmp_path / "r101")
    assert cfg is None and meta["kind"] == "resnet_backbone" and meta["depth"] == 101 and meta["arch"] == "resnet101"
    assert len(v["params"]["layer3"]) == 23
    np.testing.assert_array_equal(
        v["params"]["layer3"]["22"]["conv2"]["kernel"], sd["layer3.22.conv2.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        v["frozen"]["layer3"]["22"]["bn3"]["running_var"], sd["layer3.22.bn3.running_var"].numpy()
    )

    # it fits an R-101-FPN's trunk array for array (shapes, without running the model) ...
    sys.path.insert(0, str(REPO))
    from configs import r50_fpn_coco

    config = r50_fpn_coco.get_config()
    config.model.backbone.depth = 101
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    template = jax.eval_shape(lambda: init_variables(FasterRCNN(model_cfg), jax.random.key(0)))
    placed = param_paths.with_imagenet_backbone(template, v, model_cfg)
    for coll in ("params", "frozen"):
        body = param_paths.flat_paths(placed[coll]["backbone"]["body"])
        want = param_paths.flat_paths(template[coll]["backbone"]["body"])
        assert body.keys() == want.keys()
        assert all(tuple(body[k].shape) == tuple(want[k].shape) for k in want)
    # ... and the loop names the depth mismatch for an R-50 model
    config.train.init_backbone = str(tmp_path / "r101")
    config.model.backbone.depth = 50
    with pytest.raises(ValueError, match="ResNet-101 checkpoint cannot initialise model.backbone.depth=50"):
        _init_variables(FasterRCNN(ModelConfig.from_dict(config.model.to_dict())), config, 0)
