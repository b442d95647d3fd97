"""Training-step speed: frcnn_jax vs torchvision on CPU, same architecture and batch, same run.

    python benchmarks/train_step.py [--models c4,fpn,small] [--repeats 3]

Models: R-50-C4 (the slides' model) and R-50-FPN (torchvision v1) on 800x1066 images
(canvas 800x1088), batch 2; "small": R-18-FPN (torchvision's resnet18 layout, 64-wide
stem) on 128x128 images, batch 8. Each framework runs in its own child process (peak
memory is per framework): forward, the four losses, backward and an SGD update, with
the same sampling sizes (RPN 256 anchors, box head 512 ROIs per image; small: 128 and 64)
and frozen batch norm on both sides. Reported: median seconds per step (compile
excluded), images/s, JAX compile time, peak resident memory.

On a GPU machine, `--device gpu` times the JAX side only (bfloat16 and float32, larger
batches) for comparison with Detectron2's published per-GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from _timing import machine_line, print_table  # noqa: E402

SPECS = {
    # name: (arch, depth, image hw, canvas hw, batch, rpn per image, rois per image)
    "c4": ("c4", 50, (800, 1066), (800, 1088), 2, 256, 512),
    "fpn": ("fpn", 50, (800, 1066), (800, 1088), 2, 256, 512),
    "small": ("fpn", 18, (128, 128), (128, 128), 8, 128, 64),
}


def make_batch(spec, seed=0):
    """Images (uint8 HWC) and GT (boxes xyxy, labels 1..80) shared by both frameworks."""
    import torch_reference as tr

    _, _, (h, w), _, b, _, _ = spec
    rng = np.random.default_rng(seed)
    images, boxes, labels = [], [], []
    for _ in range(b):
        images.append(tr.structured_image(rng, h, w))
        n = int(rng.integers(3, 9))
        xy = rng.uniform(0, [w * 0.7, h * 0.7], (n, 2))
        wh = rng.uniform(0.08, 0.3, (n, 2)) * [w, h]
        boxes.append(np.concatenate([xy, xy + wh], 1).astype(np.float32))
        labels.append(rng.integers(1, 81, n).astype(np.int64))
    return images, boxes, labels


def child_torch(name, spec, repeats, threads):
    import torch
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    import torch_reference as tr

    torch.set_num_threads(threads)
    arch, depth, (h, w), _, b, rpn_n, roi_n = spec
    kw = dict(rpn_batch_size_per_image=rpn_n, box_batch_size_per_image=roi_n, min_size=h, max_size=max(h, w))
    if name == "c4":
        model = tr.build_c4(num_classes=81, **kw)
    elif depth == 50:
        model = tr.build_fpn(num_classes=81, eps=1e-5, **kw)
    else:
        resnet = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
        model = FasterRCNN(
            _resnet_fpn_extractor(resnet, 5), num_classes=81, rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=128, **kw
        )
    model.train()
    images, boxes, labels = make_batch(spec)
    imgs = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in images]
    targets = [{"boxes": torch.from_numpy(bx), "labels": torch.from_numpy(lb)} for bx, lb in zip(boxes, labels)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        losses = model(imgs, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": 0.0}


def child_jax(name, spec, repeats, dtype="float32"):
    import jax

    from frcnn_jax.data import transforms
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
    from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule
    from frcnn_jax.training.train_step import create_train_state, make_train_step

    arch, depth, (h, w), canvas, b, rpn_n, roi_n = spec
    kw = dict(arch=arch, depth=depth, num_classes=81, rpn_batch_size_per_image=rpn_n, box_batch_size_per_image=roi_n, dtype=dtype)
    if arch == "fpn":
        kw.update(pooler_resolution=7, pooler_sampling_ratio=2, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000)
    if name == "small":
        kw.update(rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=128, anchor_sizes=(32.0, 64.0, 128.0, 256.0, 512.0))
    cfg = ModelConfig(**kw)
    model = FasterRCNN(cfg)
    variables = init_variables(model, jax.random.key(0))
    ocfg = OptimConfig(base_lr=1e-3, warmup_steps=0)
    state, tx = create_train_state(model, variables, ocfg, 0)
    step = jax.jit(make_train_step(model, tx, learning_rate_schedule(ocfg)), donate_argnums=0)
    images, boxes, labels = make_batch(spec)
    g = 16
    batch = {
        "image": np.stack([transforms.pad_to_canvas(transforms.normalize(im.astype(np.float32)), canvas) for im in images]),
        "image_size": np.tile(np.array([h, w], np.int32), (b, 1)),
        "boxes": np.stack([np.pad(bx, ((0, g - len(bx)), (0, 0))) for bx in boxes]).astype(np.float32),
        "labels": np.stack([np.pad(lb, (0, g - len(lb))) for lb in labels]).astype(np.int32),
        "gt_valid": np.stack([np.arange(g) < len(bx) for bx in boxes]),
        "is_crowd": np.zeros((b, g), bool),
    }
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "device": str(jax.devices()[0].device_kind)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="c4,fpn,small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: JAX only, on the default backend")
    p.add_argument("--child", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help="override the batch size (e.g. 8+ on a GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    if args.child:
        spec = list(SPECS[args.name])
        if args.batch:
            spec[4] = args.batch
        res = child_torch(args.name, spec, args.repeats, args.threads) if args.child == "torch" else child_jax(args.name, spec, args.repeats, args.dtype)
        res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    rows = []
    frameworks = ("torch", "jax") if args.device == "cpu" else ("jax",)
    dtypes = ("float32",) if args.device == "cpu" else ("float32", "bfloat16")
    for name in args.models.split(","):
        for dtype in dtypes:
            res = {}
            for fw in frameworks:
                cmd = [sys.executable, __file__, "--child", fw, "--name", name, "--repeats", str(args.repeats),
                       "--threads", str(args.threads), "--dtype", dtype, "--batch", str(args.batch)]  # fmt: skip
                env = dict(os.environ)
                if args.device == "cpu":
                    env["JAX_PLATFORMS"] = "cpu"
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    sys.exit(f"{fw} {name} failed:\n{out.stderr[-3000:]}")
                res[fw] = json.loads(out.stdout.strip().splitlines()[-1])
            b = args.batch or SPECS[name][4]
            label = {"c4": "R-50-C4 800x1066", "fpn": "R-50-FPN 800x1066", "small": "R-18-FPN 128x128"}[name]
            j = res["jax"]
            if "torch" in res:
                t = res["torch"]
                rows.append([label, b, f"{t['step_s']:.2f}", f"{j['step_s']:.2f}", f"{j['step_s'] / t['step_s']:.2f}x",
                             f"{b / t['step_s']:.2f}", f"{b / j['step_s']:.2f}", f"{j['compile_s']:.0f}",
                             f"{t['peak_mb'] / 1024:.1f}", f"{j['peak_mb'] / 1024:.1f}"])  # fmt: skip
            else:
                rows.append([label, b, dtype, f"{j['step_s']:.3f}", f"{b / j['step_s']:.1f}", f"{j['compile_s']:.0f}", j.get("device", "")])
            print(f"done {name} {dtype}", file=sys.stderr)
    if args.device == "cpu":
        import torch
        import torchvision

        print_table(
            f"Training step (forward, 4 losses, backward, SGD), CPU, {args.threads} threads; torchvision "
            f"{torchvision.__version__} (torch {torch.__version__}); {machine_line()}",
            ["model", "batch", "torchvision s/step", "JAX s/step", "ratio", "torchvision img/s", "JAX img/s",
             "JAX compile s", "torch peak GB", "JAX peak GB"],  # fmt: skip
            rows,
        )
    else:
        print_table(f"Training step on {machine_line()}", ["model", "batch", "dtype", "s/step", "img/s", "compile s", "device"], rows)


if __name__ == "__main__":
    main()
