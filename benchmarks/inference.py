"""Inference speed: frcnn_jax vs torchvision on CPU, same weights, same images, same run.

    python benchmarks/inference.py [--archs c4,fpn,mask_fpn] [--batches 1,4] [--repeats 3] [--cpu-kernels default,ynnpack_dots]
    python benchmarks/inference.py --smoke    # tiny images, batch 1, one repeat (the test suite runs it)

For each architecture (R-50-C4 as the slides build it, torchvision's R-50-FPN v1, and
torchvision's Mask R-CNN R-50-FPN v1 with its mask logits calibrated to median 0) the
parent process builds a torchvision model with calibrated random weights (full
proposal sets, many detections), converts it with `frcnn_jax.convert`, and then times
each framework in its own child process (so peak memory is per framework): one
800x1066 image (canvas 800x1088) and a batch of 4. Reported: median seconds per image
over the repeats (full API call: preprocessing, model, postprocessing), the JAX compile
time (the first call's time less the median: compiling is what the first call adds; not
in the median) and the child's peak resident memory. For Mask R-CNN the timed call includes
the masks pasted into the original image on both sides: torchvision's `paste_masks_in_image`
inside its forward (float [N, 1, H, W]), `Detector(mask_threshold=None)` here (float32
[K, H, W], `frcnn_jax.host_masks`). `--smoke` runs the same code on a
128x170 image resized to short side 128 on both sides, batch 1, one repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository: a plain checkout works too

from _timing import machine_line, print_table  # noqa: E402
from frcnn_jax.modeling.cpu_kernels import CPU_KERNELS  # noqa: E402

# Image size, resize rule and RPN test-time proposal counts (None: the model's own, 6000/1000 for C4,
# 1000/1000 per level for FPN); the smoke run keeps C4's res5 box head on 50 proposals, not 1000.
FULL = {"hw": (800, 1066), "min_size": 800, "max_size": 1333, "rpn_test": None}
SMOKE = {"hw": (128, 170), "min_size": 128, "max_size": 224, "rpn_test": (200, 50)}


ARCHS = ("c4", "fpn", "mask_fpn")
ROW_NAME = {"c4": "R-50-C4", "fpn": "R-50-FPN", "mask_fpn": "Mask R-CNN R-50-FPN"}
CONVERT_ARCH = {"c4": "fasterrcnn_resnet50_c4", "fpn": "fasterrcnn_resnet50_fpn", "mask_fpn": "maskrcnn_resnet50_fpn"}


def bench_image(size) -> np.ndarray:
    from frcnn_jax.testing import torch_reference as tr

    return tr.structured_image(np.random.default_rng(0), *size["hw"])


def child(args) -> dict:
    """Runs in a fresh process: times one framework, prints a JSON line."""
    size = SMOKE if args.smoke else FULL
    image = bench_image(size)
    images = [image] * args.batch
    if args.framework == "torch":
        import torch

        torch.set_num_threads(args.threads)
        model = torch.load(os.path.join(args.dir, f"{args.arch}.torch"), weights_only=False).eval()
        tensors = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in images]
        with torch.no_grad():
            run = lambda: model(tensors)  # noqa: E731
            run()
            compile_s = 0.0
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = run()
                times.append(time.perf_counter() - t0)
        count = int(sum(len(o["boxes"]) for o in out))
    else:
        import jax

        from frcnn_jax import model_checkpoint
        from frcnn_jax.detector import Detector

        cfg, variables, _ = model_checkpoint.load_model(os.path.join(args.dir, f"{args.arch}.jax"))
        if size["rpn_test"]:
            pre, post = size["rpn_test"]
            cfg = cfg.updated({"rpn.test.pre_nms_top_n": pre, "rpn.test.post_nms_top_n": post})
        cfg = cfg.replace(cpu_kernels=args.cpu_kernels)  # the Detector compiles with its options
        det = Detector(
            cfg, variables, batch_size=args.batch, min_size=size["min_size"], max_size=size["max_size"],
            mask_threshold=None,  # Mask R-CNN: float probabilities pasted at the image size, as torchvision returns
        )  # fmt: skip
        # Public API only: the first call compiles (and runs once); compile time is what it adds.
        t0 = time.perf_counter()
        det(images)
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = det(images)
            times.append(time.perf_counter() - t0)
        compile_s = max(first_s - statistics.median(times), 0.0)
        count = int(sum(len(o["boxes"]) for o in out))
        assert jax.devices()[0].platform == "cpu"
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "per_image_s": statistics.median(times) / args.batch,
        "compile_s": compile_s,
        "peak_mb": peak_mb,
        "detections": count,
    }


def prepare(tmp: str, archs, threads: int, size):
    import torch

    from frcnn_jax import convert
    from frcnn_jax.testing import torch_reference as tr

    torch.set_num_threads(threads)
    image = bench_image(size)
    t = torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255
    kw = {"min_size": size["min_size"], "max_size": size["max_size"]}
    if size["rpn_test"]:
        kw.update(rpn_pre_nms_top_n_test=size["rpn_test"][0], rpn_post_nms_top_n_test=size["rpn_test"][1])
    builders = {"c4": lambda: tr.build_c4(num_classes=81, **kw), "fpn": lambda: tr.build_fpn(num_classes=91, **kw),
                "mask_fpn": lambda: tr.build_maskrcnn_fpn(num_classes=91, **kw)}  # fmt: skip
    for arch in archs:
        torch.manual_seed(0)
        model = builders[arch]()
        il, _ = model.transform([t])
        tr.calibrate(model, il.tensors)
        if arch == "mask_fpn":
            tr.calibrate_masks(model, il.tensors)  # random mask logits sit far below 0: empty masks otherwise
        torch.save(model, os.path.join(tmp, f"{arch}.torch"))
        torch.save(model.state_dict(), os.path.join(tmp, f"{arch}.pth"))
        convert.convert(CONVERT_ARCH[arch], os.path.join(tmp, f"{arch}.pth"), os.path.join(tmp, f"{arch}.jax"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="c4,fpn,mask_fpn", help="comma-separated, from c4, fpn, mask_fpn")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--smoke", action="store_true", help="tiny image, batch 1, one repeat (checks the script runs)")
    p.add_argument("--child", dest="framework", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--arch", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument(
        "--cpu-kernels", default="default",
        help="comma-separated ModelConfig.cpu_kernels settings (XLA:CPU's kernels, modeling/cpu_kernels.py): a JAX row each",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.framework:
        print(json.dumps(child(args)))
        return
    if args.smoke:
        args.batches, args.repeats = "1", 1
    size = SMOKE if args.smoke else FULL
    archs = args.archs.split(",")
    for arch in archs:
        if arch not in ARCHS:
            p.error(f"--archs: unknown {arch!r}; choose from {','.join(ARCHS)}")
    for kernels in args.cpu_kernels.split(","):
        if kernels not in CPU_KERNELS:
            p.error(f"--cpu-kernels: unknown {kernels!r}; choose from {','.join(CPU_KERNELS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prepare(tmp, archs, args.threads, size)
        for arch in archs:
            for batch, kernels in [(int(b), k) for b in args.batches.split(",") for k in args.cpu_kernels.split(",")]:
                res = {}
                for fw in ("torch", "jax"):
                    cmd = [sys.executable, __file__, "--child", fw, "--arch", arch, "--batch", str(batch), "--dir", tmp,
                           "--repeats", str(args.repeats), "--threads", str(args.threads), "--cpu-kernels", kernels,
                           ] + (["--smoke"] if args.smoke else [])  # fmt: skip
                    env = dict(os.environ, JAX_PLATFORMS="cpu")
                    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if out.returncode:
                        sys.exit(f"{fw} {arch} batch {batch} failed:\n{out.stderr[-3000:]}")
                    res[fw] = json.loads(out.stdout.strip().splitlines()[-1])
                t, j = res["torch"], res["jax"]
                rows.append([
                    ROW_NAME[arch] + (f", cpu_kernels={kernels}" if kernels != "default" else ""), batch, f"{t['per_image_s']:.2f}", f"{j['per_image_s']:.2f}",
                    f"{j['per_image_s'] / t['per_image_s']:.2f}x", f"{j['compile_s']:.0f}",
                    f"{t['peak_mb'] / 1024:.1f}", f"{j['peak_mb'] / 1024:.1f}", f"{t['detections']}/{j['detections']}",
                ])  # fmt: skip
                print(f"done {arch} batch {batch}", file=sys.stderr)
    import torch
    import torchvision

    print_table(
        f"Inference on one {size['hw'][0]}x{size['hw'][1]} image (short side {size['min_size']}), CPU, "
        f"{args.threads} threads; torchvision "
        f"{torchvision.__version__} (torch {torch.__version__}); {machine_line()}",
        [
            "model",
            "batch",
            "torchvision s/img",
            "JAX s/img",
            "ratio",
            "JAX compile s",
            "torch peak GB",
            "JAX peak GB",
            "detections tv/jax",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
