"""Serving export (`frcnn_jax.export`): CLI, sidecar, loader, the recipe that runs without
frcnn_jax, and portable lowering (cuda / tpu programs hold no CPU-only convolution path).

The parity tests use a converted, calibrated random-init torchvision R-50-FPN on two
coco128 photos at a small resize (short side 320, canvas 320x448) and batch 2, so the
photos share one compiled call. Compiling a detector for CPU takes 30-60 s on the 2-core
machine whatever its size (the NMS / ROIAlign control flow dominates), so the module
compiles three programs: the artifact (shared with the recipe's subprocess through the
persistent compilation cache), the reference `Detector`, and one tiny bfloat16 artifact.
The R-50 lowering tests only trace and lower.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from frcnn_jax import export as fexport
from frcnn_jax import model_checkpoint
from frcnn_jax.detector import Detector
from frcnn_jax.export import __main__ as cli
from frcnn_jax.modeling.config import ModelConfig, r50_fpn
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
from test_conv import cpu_conv_dots
from test_train_step import TINY

PHOTOS = ("000000000009.jpg", "000000000042.jpg")  # 640x480 and 640x478: both resize to 320x42x
MIN_SIZE, MAX_SIZE = 320, 448
CANVAS = (320, 448)
# what `frcnn_jax.convert` infers for torchvision's fasterrcnn_resnet50_fpn
R50_FPN = r50_fpn(num_classes=91, **{"backbone.bn_eps": 0.0})


# --- a converted R-50-FPN, its artifact and the loader's detections (shared by the module) ----


@pytest.fixture(scope="module")
def r50(torch, shared, tmp_path_factory):
    """{"ckpt": converted checkpoint, "paths": photo files, "photos": uint8 arrays, "tmp": dir}."""
    from PIL import Image

    from frcnn_jax import convert
    from frcnn_jax.testing import torch_reference as tr

    torch.manual_seed(0)
    model = tr.build_fpn(num_classes=91, min_size=MIN_SIZE, max_size=MAX_SIZE)
    paths = [shared / "data" / "coco128" / "images" / n for n in PHOTOS]
    photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images, _ = model.transform([torch.from_numpy(photos[0].copy()).permute(2, 0, 1).float() / 255])
    tr.calibrate(model, images.tensors)
    tmp = tmp_path_factory.mktemp("export_r50")
    torch.save(model.state_dict(), tmp / "fpn.pth")
    ckpt = convert.convert("fasterrcnn_resnet50_fpn", tmp / "fpn.pth", tmp / "ckpt")
    (tmp / "fpn.pth").unlink()
    return {"ckpt": ckpt, "paths": paths, "photos": photos, "tmp": tmp}


@pytest.fixture(scope="module")
def artifact(r50):
    """The CLI's artifact: one canvas, a symbolic batch (used at 2), default platforms (cpu, cuda, tpu)."""
    out = r50["tmp"] / "serve" / "fpn.jaxexport"
    args = ["--checkpoint", str(r50["ckpt"]), "--out", str(out), "--canvas", "320x448", "--batch", "2",
            "--dynamic-batch", "--min-size", str(MIN_SIZE), "--max-size", str(MAX_SIZE)]  # fmt: skip
    stdout = io.StringIO()  # in-process (`python -m frcnn_jax.export` itself runs in the error tests)
    with contextlib.redirect_stdout(stdout):
        assert cli.main(args) == 0
    assert f"{out}: canvas 320x448, batch b (dynamic), float32, cpu,cuda,tpu" in stdout.getvalue()
    return out


@pytest.fixture(scope="module")
def loaded(artifact, r50):
    """(ExportedDetector, its detections on the two photos)."""
    det = fexport.load(artifact)
    return det, det(r50["photos"])


def test_sidecar_holds_the_preprocessing_contract(artifact, r50):
    doc = json.loads(fexport.sidecar_path(artifact).read_text())
    meta = model_checkpoint.read_model_json(r50["ckpt"])["metadata"]
    assert doc["format"] == fexport.SIDECAR_FORMAT
    assert doc["preprocessing"]["mean"] == [0.485, 0.456, 0.406] and doc["preprocessing"]["std"] == [
        0.229,
        0.224,
        0.225,
    ]
    assert (doc["preprocessing"]["min_size"], doc["preprocessing"]["max_size"]) == (MIN_SIZE, MAX_SIZE)
    assert doc["canvases"] == [list(CANVAS)] and doc["batch"] == 2 and doc["dynamic_batch"] is True
    assert doc["platforms"] == ["cpu", "cuda", "tpu"] and doc["dtype"] == "float32"
    assert doc["class_names"] == meta["class_names"] and doc["class_names"][1] == "person"
    assert doc["label_to_category_id"] == meta["label_to_category_id"]
    (entry,) = doc["artifacts"]
    assert entry["file"] == artifact.name and entry["bytes"] == artifact.stat().st_size
    assert entry["inputs"] == [
        {"name": "images", "shape": ["b", 320, 448, 3], "dtype": "float32"},
        {"name": "image_sizes", "shape": ["b", 2], "dtype": "int32"},
    ]
    assert {o["name"]: (o["shape"], o["dtype"]) for o in entry["outputs"]} == {
        "boxes": (["b", 100, 4], "float32"), "labels": (["b", 100], "int32"),
        "scores": (["b", 100], "float32"), "valid": (["b", 100], "bool"),
    }  # fmt: skip
    # the file is the serialized program alone: it deserializes without the model code
    exp = jax.export.deserialize(bytearray(artifact.read_bytes()))
    assert exp.platforms == ("cpu", "cuda", "tpu") and exp.nr_devices == 1


def test_artifact_gives_exactly_the_detectors_detections(loaded, r50):
    """Same photos, same canvas and batch: the deserialised program equals `Detector`, bit for bit
    (its symbolic batch refined to 2 against Detector's static batch of 2)."""
    det, got = loaded
    ref_det = Detector.from_checkpoint(
        r50["ckpt"], canvases=[CANVAS], batch_size=2, min_size=MIN_SIZE, max_size=MAX_SIZE
    )
    ref = ref_det(r50["photos"])
    for name, g, r in zip(PHOTOS, got, ref):
        assert len(r["boxes"]) > 10, "calibrated random weights give detections"
        for key in ("boxes", "scores", "labels"):
            assert g[key].dtype == r[key].dtype and np.array_equal(g[key], r[key]), (name, key)
        h, w = r50["photos"][PHOTOS.index(name)].shape[:2]
        assert g["boxes"][:, 2].max() <= w + 1e-3 and g["boxes"][:, 3].max() <= h + 1e-3  # original pixels
    # the loader's score_thresh (at or above the compiled one): scores > threshold kept, order unchanged.
    assert det.score_thresh == ref_det.score_thresh == det.sidecar["score_thresh"]
    thr = float(np.median(ref[0]["scores"]))
    compiled, det.score_thresh = det.score_thresh, thr
    try:
        for g, r in zip(det(r50["photos"]), ref):
            keep = r["scores"] > thr
            assert np.array_equal(g["scores"], r["scores"][keep]) and np.array_equal(g["boxes"], r["boxes"][keep])
    finally:
        det.score_thresh = compiled


def _recipe_code() -> str:
    """The python block after `<!-- export-recipe -->` in the README ("Export and serving")."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- export-recipe -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md: no python block after the <!-- export-recipe --> marker"
    return m.group(1)


def run_recipe(artifact, image_paths, tmp_path) -> list[dict]:
    """Runs the README's serving recipe as a script on `image_paths`; its JSON lines. The
    script fails if the recipe imported frcnn_jax, flax or orbax."""
    script = tmp_path / "serve.py"
    script.write_text(
        _recipe_code() + '\nassert "frcnn_jax" not in sys.modules, "the recipe imported frcnn_jax"\n'
        'assert not any(m.startswith(("flax", "orbax")) for m in sys.modules), "the recipe imported model code"\n'
    )
    env = dict(os.environ)
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)  # reuse the loader's compile
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
    r = subprocess.run(
        [sys.executable, str(script), str(artifact), *map(str, image_paths)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_recipe_runs_the_artifact_without_frcnn_jax(loaded, artifact, r50, tmp_path):
    lines = run_recipe(artifact, r50["paths"], tmp_path)
    assert [line["image"] for line in lines] == list(map(str, r50["paths"]))
    names = json.loads(fexport.sidecar_path(artifact).read_text())["class_names"]
    for line, want in zip(lines, loaded[1]):
        dets = line["detections"]
        assert len(dets) == len(want["scores"]) > 0
        assert np.array_equal(np.array([d["box"] for d in dets], np.float32), want["boxes"])
        assert np.array_equal(np.array([d["score"] for d in dets], np.float32), want["scores"])
        assert [d["label"] for d in dets] == want["labels"].tolist()
        assert [d["name"] for d in dets] == [names[k] for k in want["labels"]]


# --- bad input: one error line, exit code 2 (arguments) or 1 (checkpoint) ----------------------


def _cli_error(capsys, argv) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--canvas", "800x1300"], 2, "--canvas 800x1300: canvas (H, W)=(800, 1300) must be positive multiples of 32"),
        (["--canvas", "800"], 2, "--canvas '800': expected HxW, e.g. 800x1344"),
        (["--canvas", "320x448", "--platforms", "cpu,gpu"], 2, "unknown platform 'gpu' (use cuda or rocm)"),
        (["--canvas", "320x448", "--platforms", "cpu,metal"], 2, "unknown platform 'metal'"),
        (["--canvas", "320x448", "--dtype", "float16"], 2, "--dtype must be one of float32, bfloat16"),
        (["--canvas", "320x448", "--batch", "0"], 2, "--batch must be >= 1"),
        (["--canvas", "320x448", "--batch", "two"], 2, "argument --batch: invalid int value: 'two'"),
        (["--canvas", "320x448", "--out", "{tmp}"], 2, "is a directory; give the artifact's file name"),
        (["--canvas", "320x448", "--score-thresh", "2"], 2, "--score-thresh must be in [0, 1], got 2.0"),
        (["--canvas", "320x448", "--detections-per-img", "0"], 2, "--detections-per-img must be >= 1, got 0"),
    ],
)
def test_bad_arguments_are_one_error_line(capsys, tmp_path, extra, code, message):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    argv = ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.jaxexport"), "--batch", "1", *extra]
    got_code, err = _cli_error(capsys, argv)
    assert got_code == code and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "x.jaxexport").exists()


def test_unusable_checkpoints_are_one_error_line(capsys, tmp_path):
    args = ["--out", str(tmp_path / "x.jaxexport"), "--canvas", "320x448", "--batch", "1"]
    code, err = _cli_error(capsys, ["--checkpoint", str(tmp_path / "missing"), *args])
    assert code == 1 and err == f"error: checkpoint {tmp_path / 'missing'} does not exist\n"
    code, err = _cli_error(capsys, ["--checkpoint", str(tmp_path), *args])  # an empty directory
    assert code == 1 and err.startswith("error: ") and "not a training work directory" in err and err.count("\n") == 1
    backbone = model_checkpoint.save_model(
        tmp_path / "r50", {"params": {"w": np.zeros(2, np.float32)}, "frozen": {}}, None, {"kind": "resnet_backbone"}
    )
    # as a subprocess: exit code and stderr exactly as a user sees them, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "frcnn_jax.export", "--checkpoint", str(backbone), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert (
        r.returncode == 1 and r.stderr == f"error: {backbone} holds a backbone only (resnet_backbone), not a detector\n"
    )
    assert not (tmp_path / "x.jaxexport").exists()


# --- bfloat16, several canvases, static batch (a tiny model: one compile) -----------------------


def test_bfloat16_multi_canvas_export_runs_and_gives_valid_detections(tmp_path, capsys):
    cfg = ModelConfig.from_dict({
        **TINY, "arch": "fpn", "anchors.sizes": (16.0, 32.0, 64.0, 128.0, 256.0), "backbone.fpn_channels": 32,
        "roi_heads.representation_size": 32, "roi_heads.postprocess.score_thresh": 0.0,
    })  # fmt: skip
    variables = init_variables(FasterRCNN(cfg), jax.random.key(0))
    ckpt = model_checkpoint.save_model(
        tmp_path / "ckpt", variables, cfg, {"class_names": ["__background__", "a", "b", "c"]}
    )
    out = tmp_path / "serve" / "tiny.jaxexport"
    argv = ["--checkpoint", str(ckpt), "--out", str(out), "--canvas", "96x128", "--canvas", "128x96", "--batch", "2",
            "--dtype", "bfloat16", "--min-size", "90", "--max-size", "120", "--detections-per-img", "6",
            "--nms-thresh", "0.4"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    files = sorted(p.name for p in out.parent.iterdir())
    assert files == ["tiny-128x96.jaxexport", "tiny-96x128.jaxexport", "tiny.jaxexport.json"]
    doc = fexport.read_sidecar(out)
    assert doc["dtype"] == "bfloat16" and doc["model"]["dtype"] == "bfloat16" and not doc["dynamic_batch"]
    # the post-process flags are compiled in (the checkpoint's detections_per_img is 10, nms_thresh 0.5)
    assert (doc["detections_per_img"], doc["nms_thresh"], doc["score_thresh"]) == (6, 0.4, 0.0)
    assert doc["model"]["roi_heads"]["postprocess"]["detections_per_img"] == 6
    assert [a["canvas"] for a in doc["artifacts"]] == [[96, 128], [128, 96]]
    assert doc["artifacts"][0]["inputs"][0] == {"name": "images", "shape": [2, 96, 128, 3], "dtype": "float32"}
    # bfloat16 weights: the artifact is smaller than a float32 one would be, inputs/outputs unchanged
    assert doc["artifacts"][0]["outputs"][0] == {"name": "boxes", "shape": [2, 6, 4], "dtype": "float32"}

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, hw + (3,), dtype=np.uint8) for hw in [(60, 80), (66, 88)]]  # both -> 96x128
    det = fexport.load(out)
    results = det(images)
    for image, r in zip(images, results):
        h, w = image.shape[:2]
        assert 0 < len(r["scores"]) <= 6
        assert r["boxes"].dtype == np.float32 and r["scores"].dtype == np.float32 and r["labels"].dtype == np.int32
        assert np.isfinite(r["boxes"]).all() and (r["boxes"][:, :2] <= r["boxes"][:, 2:]).all()
        assert (r["boxes"] >= 0).all() and (r["boxes"][:, 2] <= w + 1e-3).all() and (r["boxes"][:, 3] <= h + 1e-3).all()
        assert (np.diff(r["scores"]) <= 0).all() and ((r["labels"] >= 1) & (r["labels"] < cfg.num_classes)).all()
    single = det(images[1])  # one image: a dict, the batch padded to 2 as Detector pads it
    assert np.array_equal(single["boxes"], results[1]["boxes"])


# --- portability: lowering for cuda and tpu on this CPU machine -------------------------------


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_r50_fpn_forward_lowers_for_cuda_and_tpu_without_the_cpu_conv_path(dtype):
    """The serving forward (weights as arguments here, to keep the text small) for cuda + tpu
    holds only XLA convolutions; lowered for cpu it has conv.py's matrix products."""
    cfg = R50_FPN.replace(dtype=dtype)
    model = FasterRCNN(cfg)
    variables = _abstract(jax.eval_shape(lambda: init_variables(model, jax.random.key(0))))
    specs = (variables, jax.ShapeDtypeStruct((1, 800, 1344, 3), jnp.float32), jax.ShapeDtypeStruct((1, 2), jnp.int32))
    fn = jax.jit(lambda v, images, sizes: fexport.forward_fn(cfg, v)(images, sizes))
    accel = jax.export.export(fn, platforms=("cuda", "tpu"))(*specs)
    cpu = jax.export.export(fn, platforms=("cpu",))(*specs)
    accel_text, cpu_text = accel.mlir_module(), cpu.mlir_module()
    assert accel.platforms == ("cuda", "tpu")
    assert cpu_conv_dots(accel_text) == 0, "CPU-only matrix-product convolutions in the cuda/tpu program"
    assert cpu_conv_dots(cpu_text) >= 50  # 36 1x1 convs of the trunk, 4 FPN lateral convs, 2 x 5 RPN head outputs
    assert accel_text.count("stablehlo.convolution") > cpu_text.count("stablehlo.convolution") > 0
    bf16 = "xbf16>" in accel_text
    assert bf16 == (dtype == "bfloat16")
    assert {a.dtype for a in accel.out_avals} == {jnp.dtype("float32"), jnp.dtype("int32"), jnp.dtype("bool")}


def test_sharded_r50_fpn_train_step_lowers_for_cuda_and_tpu():
    """The whole training step as train.py jits it (8 devices, batch sharded, state replicated):
    its cuda/tpu program has XLA's convolution gradients only, the CPU one per-tap kernel gradients."""
    from frcnn_jax.modeling.param_paths import frozen_param_paths
    from frcnn_jax.training import sharding
    from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule, make_optimizer
    from frcnn_jax.training.train_step import create_train_state, make_train_step

    assert jax.device_count() == 8
    model = FasterRCNN(R50_FPN)
    ocfg = OptimConfig(base_lr=0.02, warmup_steps=2, decay_steps=(50,), total_steps=100)
    variables = jax.eval_shape(lambda: init_variables(model, jax.random.key(0)))
    state = _abstract(jax.eval_shape(lambda: create_train_state(model, variables, ocfg, 0)[0]))
    tx = make_optimizer(ocfg, variables["params"], frozen_param_paths(model.cfg))
    step = sharding.shard_train_step(
        make_train_step(model, tx, learning_rate_schedule(ocfg)), sharding.data_mesh(), state
    )
    b, hw, g = 8, 256, 4
    batch = {
        "image": jax.ShapeDtypeStruct((b, hw, hw, 3), jnp.float32), "image_size": jax.ShapeDtypeStruct((b, 2), jnp.int32),
        "boxes": jax.ShapeDtypeStruct((b, g, 4), jnp.float32), "labels": jax.ShapeDtypeStruct((b, g), jnp.int32),
        "gt_valid": jax.ShapeDtypeStruct((b, g), jnp.bool_), "is_crowd": jax.ShapeDtypeStruct((b, g), jnp.bool_),
    }  # fmt: skip
    traced = step.trace(state, batch)
    accel = traced.lower(lowering_platforms=("cuda", "tpu")).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    for text in (accel, cpu):
        assert "mhlo.num_partitions = 8" in text
    assert cpu_conv_dots(accel) == 0, "CPU-only matrix products (forward or kernel gradient) in the cuda/tpu step"
    # P2 (8 x 64 x 64 x 256 = 2**23 elements) takes the custom per-tap kernel gradient on CPU
    p2 = r"\(tensor<8x64x64x256xf32>, tensor<8x64x64x256xf32>\) -> tensor<256x256xf32>"
    p2_kernel_grads = re.findall(r"stablehlo\.dot_general[^\n]*: " + p2, cpu)
    assert len(p2_kernel_grads) >= 9, "the CPU step lost the per-tap kernel gradient of the P2 3x3 convs"
    assert cpu_conv_dots(cpu) > len(p2_kernel_grads)
