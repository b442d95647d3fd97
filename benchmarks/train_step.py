"""Training-step speed: frcnn_jax vs torchvision on CPU, same architecture and batch, same run.

    python benchmarks/train_step.py [--models c4,fpn,maskfpn,small] [--repeats 3] [--cpu-kernels default,ynnpack_dots]
    python benchmarks/train_step.py --remat none,backbone,all [--cpu-scheduler default,memory]
    python benchmarks/train_step.py --smoke [--remat none,all]   # R-18-FPN (+ mask) on 64x96, one repeat (the suite runs it)

Models: R-50-C4 (the slides' model) and R-50-FPN (torchvision v1) on 800x1066 images
(canvas 800x1088), batch 2; "small": R-18-FPN (torchvision's resnet18 layout, 64-wide
stem) on 128x128 images, batch 8; "maskfpn": Mask R-CNN R-50-FPN (torchvision's
maskrcnn_resnet50_fpn v1: mask head 4 x conv 256, 28x28 masks) on fpn's batch plus a mask
per box (JAX trains on the host's 112x112 crops, torchvision on the full-resolution masks),
so its row beside "fpn" shows what the mask branch costs. Each framework runs in its own child process (peak
memory is per framework): forward, the four losses, backward and an SGD update, with
the same sampling sizes (RPN 256 anchors, box head 512 ROIs per image; small: 128 and 64)
and frozen batch norm on both sides. Reported: median seconds per step (compile
excluded), images/s, JAX compile time, peak resident memory: of the whole child ("peak") and
of the steps alone ("step peak", Linux: the peak is reset after torch builds its model and
after JAX compiles, whose compiler peaks higher than the step). The parent process draws the
batch (torch_reference needs torch) and hands it to both children in a file, so the JAX
child never imports torch (whose import alone is ~0.6 GB of resident memory).
`--cpu-kernels`: one JAX row per `ModelConfig.cpu_kernels` setting (XLA:CPU's kernels,
`modeling/cpu_kernels.py`), each compiled with its options (each row of the default table
beside its own torch child; the `--remat` table's one torch row).

`--remat` compares `ModelConfig.remat` settings (default model: "fpn1344", R-50-FPN on
800x1333 images, canvas 800x1344, batch 2) in one table beside torch's same step: median
step time and peak resident memory, each also as a ratio to JAX "none" (first setting,
first scheduler) and to torch, plus XLA's temp-buffer size (`memory_analysis`). Each
setting x `--cpu-scheduler` is its own JAX child: "default" is XLA:CPU's
concurrency-optimised schedule, "memory" compiles the step with
`xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED` (a per-compile option).
`--malloc-trim`: the JAX child calls glibc's `malloc_trim(0)` after compiling, returning
the heap XLA's compiler freed (~1.2 GB for R-50-FPN, otherwise still resident) to the OS.
`--mmap-threshold-mb X`: both children pin glibc's mmap threshold at X MiB from the start
(JAX as `train.malloc_mmap_threshold_mb` does, `host_memory.pin_mmap_threshold`; torch
through glibc's `MALLOC_MMAP_THRESHOLD_`), so freed step buffers leave the process
instead of fragmenting the heap; without it glibc's threshold adapts, and the peak moves
between runs.

On a GPU machine, `--device gpu` times the JAX side only (bfloat16 and float32, larger
batches) for comparison with Detectron2's published per-GPU figures.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from _timing import machine_line, peak_rss_mb, print_table, reset_peak_rss  # noqa: E402
from frcnn_jax.modeling.cpu_kernels import CPU_KERNELS  # noqa: E402
from frcnn_jax.training.host_memory import (  # noqa: E402
    CPU_SCHEDULERS,
    pin_mmap_threshold,
    release_freed_heap,
    step_compiler_options,
)

SPECS = {
    # name: (arch, depth, image hw, canvas hw, batch, rpn per image, rois per image, Mask R-CNN)
    "c4": ("c4", 50, (800, 1066), (800, 1088), 2, 256, 512, False),
    "fpn": ("fpn", 50, (800, 1066), (800, 1088), 2, 256, 512, False),
    "maskfpn": ("fpn", 50, (800, 1066), (800, 1088), 2, 256, 512, True),  # fpn's batch + masks
    "fpn1344": ("fpn", 50, (800, 1333), (800, 1344), 2, 256, 512, False),  # the widest COCO canvas (--remat)
    "small": ("fpn", 18, (128, 128), (128, 128), 8, 128, 64, False),
    # --smoke: the same code paths on tiny inputs
    "smoke": ("fpn", 18, (64, 96), (64, 96), 2, 32, 16, False),
    "smoke_mask": ("fpn", 18, (64, 96), (64, 96), 2, 32, 16, True),
}
SMOKE_MODELS = "smoke,smoke_mask"
MASK_CROP = 112  # JAX's host crop size S (data.mask_size of the COCO mask configs)


def model_label(name: str, spec, buckets: int = 0) -> str:
    arch, depth, (h, w) = spec[0], spec[1], spec[2]
    mask = " Mask R-CNN" + (f" (mask.train_buckets={buckets})" if buckets else "")
    return f"R-{depth}-{arch.upper()} {h}x{w}" + (mask if spec[7] else "")


def box_masks(boxes, h: int, w: int):
    """uint8 [N, h, w]: the ellipse inscribed in each box (x1, y1, x2, y2), the instances' masks."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    out = np.zeros((len(boxes), h, w), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64)):
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 1), max((y2 - y1) / 2, 1)
        out[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return out


def make_batch(spec, seed=0):
    """Images (uint8 HWC) and GT (boxes xyxy, labels 1..80) shared by both frameworks."""
    from frcnn_jax.testing import torch_reference as tr

    _, _, (h, w), _, b = spec[:5]
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


def save_batch(path, spec):
    """`make_batch(spec)` into an .npz (boxes and labels padded, with their counts)."""
    images, boxes, labels = make_batch(spec)
    g = max(len(b) for b in boxes)
    np.savez(
        path,
        images=np.stack(images),
        boxes=np.stack([np.pad(b, ((0, g - len(b)), (0, 0))) for b in boxes]),
        labels=np.stack([np.pad(lb, (0, g - len(lb))) for lb in labels]),
        counts=np.array([len(b) for b in boxes]),
    )


def load_batch(path):
    """(images, boxes, labels) lists as `make_batch` returns them, from `save_batch`'s file."""
    f = np.load(path)
    counts = f["counts"]
    return (
        list(f["images"]),
        [b[:n] for b, n in zip(f["boxes"], counts)],
        [lb[:n] for lb, n in zip(f["labels"], counts)],
    )


# `--cpu-scheduler` name -> XLA compile options of the JAX step (the loop's `train.xla_cpu_scheduler`).
SCHEDULERS = tuple(CPU_SCHEDULERS)


def child_torch(name, spec, repeats, threads, batch_file):
    import torch
    import torchvision
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    from frcnn_jax.testing import torch_reference as tr

    torch.set_num_threads(threads)
    arch, depth, (h, w), _, b, rpn_n, roi_n, mask = spec
    kw = dict(rpn_batch_size_per_image=rpn_n, box_batch_size_per_image=roi_n, min_size=h, max_size=max(h, w))
    if arch == "c4":
        model = tr.build_c4(num_classes=81, **kw)
    elif depth == 50:
        model = (tr.build_maskrcnn_fpn if mask else tr.build_fpn)(num_classes=81, eps=1e-5, **kw)
    else:
        resnet = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
        model = (MaskRCNN if mask else FasterRCNN)(
            _resnet_fpn_extractor(resnet, 5),
            num_classes=81,
            rpn_pre_nms_top_n_train=600,
            rpn_post_nms_top_n_train=128,
            **kw,
        )
    model.train()
    images, boxes, labels = load_batch(batch_file)
    imgs = [torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255 for im in images]
    targets = [{"boxes": torch.from_numpy(bx), "labels": torch.from_numpy(lb)} for bx, lb in zip(boxes, labels)]
    if mask:  # full-resolution masks, as torchvision's transform resizes them (here: no resize)
        for t, bx in zip(targets, boxes):
            t["masks"] = torch.from_numpy(box_masks(bx, h, w))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def step():
        losses = model(imgs, targets)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    reset = reset_peak_rss()  # the steps' peak apart from building the model (as JAX's apart from compiling)
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": 0.0, "step_peak_mb": peak_rss_mb() if reset else None}


def child_jax(
    name, spec, repeats, batch_file, dtype="float32", remat="none", scheduler="default", malloc_trim=False, buckets=0,
    cpu_kernels="default",
):  # fmt: skip
    import jax

    from frcnn_jax.data import masks as host_masks
    from frcnn_jax.data import transforms
    from frcnn_jax.modeling.config import ModelConfig, maskrcnn_r50_fpn
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
    from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule
    from frcnn_jax.training.train_step import create_train_state, make_train_step

    arch, depth, (h, w), canvas, b, rpn_n, roi_n, mask = spec
    kw = {"arch": arch, "backbone.depth": depth, "num_classes": 81, "rpn.assigner.batch_size_per_image": rpn_n,
          "roi_heads.assigner.batch_size_per_image": roi_n, "dtype": dtype, "remat": remat,
          "cpu_kernels": cpu_kernels}  # fmt: skip
    if arch == "fpn":
        kw.update({"roi_heads.pooler": {"resolution": 7, "sampling_ratio": 2},
                   "rpn.train": {"pre_nms_top_n": 2000, "post_nms_top_n": 2000}})  # fmt: skip
    if depth == 18 and arch == "fpn":
        kw.update({"rpn.train": {"pre_nms_top_n": 600, "post_nms_top_n": 128},
                   "anchors.sizes": (32.0, 64.0, 128.0, 256.0, 512.0)})  # fmt: skip
    if mask:  # torchvision's mask branch: `config.maskrcnn_r50_fpn`'s section (its train_buckets unless given)
        kw["mask"] = dataclasses.asdict(maskrcnn_r50_fpn().mask) | ({"train_buckets": buckets} if buckets else {})
    cfg = ModelConfig.from_dict(kw)
    model = FasterRCNN(cfg)
    variables = init_variables(model, jax.random.key(0))
    ocfg = OptimConfig(base_lr=1e-3, warmup_steps=0)
    state, tx = create_train_state(model, variables, ocfg, 0)
    step = jax.jit(make_train_step(model, tx, learning_rate_schedule(ocfg)), donate_argnums=0)
    images, boxes, labels = load_batch(batch_file)
    g = 16
    batch = {
        "image": np.stack(
            [transforms.pad_to_canvas(transforms.normalize(im.astype(np.float32)), canvas) for im in images]
        ),
        "image_size": np.tile(np.array([h, w], np.int32), (b, 1)),
        "boxes": np.stack([np.pad(bx, ((0, g - len(bx)), (0, 0))) for bx in boxes]).astype(np.float32),
        "labels": np.stack([np.pad(lb, (0, g - len(lb))) for lb in labels]).astype(np.int32),
        "gt_valid": np.stack([np.arange(g) < len(bx) for bx in boxes]),
        "is_crowd": np.zeros((b, g), bool),
    }
    if mask:  # the pipeline's representation: each mask cropped to its support at S x S (data.masks)
        crops = [host_masks.crop_instance_masks(box_masks(bx, h, w), (h, w), False, MASK_CROP) for bx in boxes]
        padded = [host_masks.pad_masks(c, cb, g) for c, cb in crops]
        batch["gt_masks"] = np.stack([p["gt_masks"] for p in padded])
        batch["gt_mask_boxes"] = np.stack([p["gt_mask_boxes"] for p in padded])
    t0 = time.perf_counter()
    step = step.lower(state, batch).compile(step_compiler_options(scheduler, cpu_kernels))  # as the loop compiles it
    compile_s = time.perf_counter() - t0
    temp_gb = step.memory_analysis().temp_size_in_bytes / 2**30
    if malloc_trim:
        release_freed_heap()
    reset = reset_peak_rss()  # the steps' peak apart from the compiler's
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    device = str(jax.devices()[0].device_kind)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "temp_gb": temp_gb, "device": device,
            "step_peak_mb": peak_rss_mb() if reset else None}  # fmt: skip


def _mmap_note(args) -> str:
    return f", glibc mmap threshold pinned at {args.mmap_threshold_mb:g} MiB" if args.mmap_threshold_mb > 0 else ""


def _gb(mb, digits=1):
    return "-" if mb is None else f"{mb / 1024:.{digits}f}"


def run_child(fw, name, args, batch_file, dtype="float32", remat="none", scheduler="default", cpu_kernels="default"):
    """Runs one framework's step in a child process; its result dict (with peak_mb)."""
    cmd = [sys.executable, __file__, "--child", fw, "--name", name, "--repeats", str(args.repeats),
           "--threads", str(args.threads), "--dtype", dtype, "--batch", str(args.batch), "--batch-file", batch_file,
           "--remat", remat, "--cpu-scheduler", scheduler, "--mask-buckets", str(args.mask_buckets),
           "--cpu-kernels", cpu_kernels]  # fmt: skip
    cmd += ["--malloc-trim"] if args.malloc_trim else []
    cmd += ["--mmap-threshold-mb", str(args.mmap_threshold_mb)]
    env = dict(os.environ)
    if args.mmap_threshold_mb > 0 and fw == "torch":  # the JAX child pins it itself, as the training loop does
        env["MALLOC_MMAP_THRESHOLD_"] = str(int(args.mmap_threshold_mb * 2**20))
    if args.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{fw} {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def remat_table(args, settings, schedulers, tmp):
    """Table rows: torch, then JAX for each remat setting x CPU scheduler, per `--models` entry.

    Ratios are against torch's row and against JAX "none" with the first scheduler.
    """
    rows = []
    for name in args.models.split(","):
        spec = list(SPECS[name])
        if args.batch:
            spec[4] = args.batch
        batch_file = os.path.join(tmp, f"{name}.npz")
        save_batch(batch_file, spec)
        t = run_child("torch", name, args, batch_file)
        print(f"done {name} torch", file=sys.stderr)
        label = f"{model_label(name, spec, args.mask_buckets)} (canvas {spec[3][0]}x{spec[3][1]})"
        rows.append([label, spec[4], "torchvision", "-", f"{t['step_s']:.2f}", "-", "1.00x",
                     f"{t['peak_mb'] / 1024:.2f}", "-", "1.00x", _gb(t.get("step_peak_mb"), 2), "-", "-"])  # fmt: skip
        res = {}
        for kernels in args.cpu_kernels.split(","):
            for scheduler in schedulers:
                for remat in settings:
                    res[remat, scheduler, kernels] = run_child(
                        "jax", name, args, batch_file, remat=remat, scheduler=scheduler, cpu_kernels=kernels
                    )
                    print(f"done {name} jax {remat} {scheduler} {kernels}", file=sys.stderr)
        first = ("none", schedulers[0], args.cpu_kernels.split(",")[0])
        base = res.get(first, next(iter(res.values())))  # the ratios' "JAX none"
        for (remat, scheduler, kernels), j in res.items():
            kernels_note = f", cpu_kernels={kernels}" if kernels != "default" else ""
            rows.append([label, spec[4], f"JAX remat={remat}{kernels_note}", scheduler, f"{j['step_s']:.2f}",
                         f"{j['step_s'] / base['step_s']:.2f}x", f"{j['step_s'] / t['step_s']:.2f}x",
                         f"{j['peak_mb'] / 1024:.2f}", f"{j['peak_mb'] / base['peak_mb']:.2f}x",
                         f"{j['peak_mb'] / t['peak_mb']:.2f}x", _gb(j.get("step_peak_mb"), 2), f"{j['temp_gb']:.2f}",
                         f"{j['compile_s']:.0f}"])  # fmt: skip
    return rows


DEFAULT_MODELS = "c4,fpn,maskfpn,small"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", help=f"comma-separated, of {list(SPECS)} (default {DEFAULT_MODELS}; with --remat fpn1344)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="gpu: JAX only, on the default backend")
    p.add_argument("--child", choices=["torch", "jax"], help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help="override the batch size (e.g. 8+ on a GPU)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat", default="", help="comma-separated ModelConfig.remat settings, e.g. none,backbone,all")
    p.add_argument("--cpu-scheduler", default="default", help=f"with --remat: comma-separated, of {list(SCHEDULERS)}")
    p.add_argument("--malloc-trim", action="store_true", help="JAX: malloc_trim(0) after compiling (see above)")
    p.add_argument(
        "--mmap-threshold-mb", type=float, default=0.0,
        help="both children: pin glibc's mmap threshold at this many MiB (0: glibc's adaptive one; see above)",
    )  # fmt: skip
    p.add_argument(
        "--mask-buckets", type=int, default=0,
        help="Mask R-CNN: ModelConfig.mask.train_buckets (default: the R-50 recipe's, 3; 1 = all P = 128 slots)",
    )  # fmt: skip
    p.add_argument("--batch-file", help=argparse.SUPPRESS)
    p.add_argument(
        "--cpu-kernels",
        default="default",
        help=f"comma-separated ModelConfig.cpu_kernels settings, of {list(CPU_KERNELS)}",
    )
    p.add_argument(
        "--smoke", action="store_true", help="a tiny R-18-FPN and its Mask R-CNN on 64x96 images, one repeat"
    )
    args = p.parse_args(argv)
    if args.smoke and not args.child:
        args.models, args.repeats = args.models or SMOKE_MODELS, 1
    if args.child:
        spec = list(SPECS[args.name])
        if args.batch:
            spec[4] = args.batch
        if args.child == "jax" and args.mmap_threshold_mb > 0:
            pin_mmap_threshold(args.mmap_threshold_mb)
        if args.child == "torch":
            res = child_torch(args.name, spec, args.repeats, args.threads, args.batch_file)
        else:
            remat = args.remat or "none"
            res = child_jax(
                args.name, spec, args.repeats, args.batch_file, args.dtype, remat, args.cpu_scheduler, args.malloc_trim,
                args.mask_buckets, args.cpu_kernels,
            )  # fmt: skip
        res["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    unknown = sorted(set(args.cpu_kernels.split(",")) - set(CPU_KERNELS))
    if unknown:
        sys.exit(f"--cpu-kernels: unknown {unknown}; valid: {list(CPU_KERNELS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.remat:
            remat_main(args, tmp)
        else:
            default_main(args, tmp)


def remat_main(args, tmp):
    import torch
    import torchvision

    if args.device != "cpu":
        sys.exit("--remat compares with torch on CPU (use --device cpu)")
    args.models = args.models or "fpn1344"
    settings, schedulers = args.remat.split(","), args.cpu_scheduler.split(",")
    unknown = sorted(set(schedulers) - set(SCHEDULERS))
    if unknown:
        sys.exit(f"--cpu-scheduler: unknown {unknown}; valid: {list(SCHEDULERS)}")
    rows = remat_table(args, settings, schedulers, tmp)
    print_table(
        f"Training step (forward, the losses (4; Mask R-CNN 5), backward, SGD) by ModelConfig.remat, CPU, {args.threads} threads"
        f"{', JAX with malloc_trim after compiling' if args.malloc_trim else ''}{_mmap_note(args)}; "
        f"torchvision {torchvision.__version__} (torch {torch.__version__}); {machine_line()}; {time.strftime('%Y-%m-%d')}",
        [
            "model",
            "batch",
            "framework",
            "XLA CPU scheduler",
            "s/step",
            "vs JAX none",
            "vs torch",
            "peak GB",
            "vs JAX none",
            "vs torch",
            "step peak GB",
            "XLA temp GB",
            "JAX compile s",
        ],  # fmt: skip
        rows,
    )


def default_main(args, tmp):
    args.models = args.models or DEFAULT_MODELS
    rows = []
    frameworks = ("torch", "jax") if args.device == "cpu" else ("jax",)
    dtypes = ("float32",) if args.device == "cpu" else ("float32", "bfloat16")
    for name in args.models.split(","):
        spec = list(SPECS[name])
        if args.batch:
            spec[4] = args.batch
        batch_file = os.path.join(tmp, f"{name}.npz")
        save_batch(batch_file, spec)
        for dtype, kernels in [(d, k) for d in dtypes for k in args.cpu_kernels.split(",")]:
            res = {fw: run_child(fw, name, args, batch_file, dtype, cpu_kernels=kernels) for fw in frameworks}
            b = args.batch or SPECS[name][4]
            label = model_label(name, SPECS[name], args.mask_buckets)
            label += f", cpu_kernels={kernels}" if kernels != "default" else ""
            j = res["jax"]
            if "torch" in res:
                t = res["torch"]
                rows.append([label, b, f"{t['step_s']:.2f}", f"{j['step_s']:.2f}", f"{j['step_s'] / t['step_s']:.2f}x",
                             f"{b / t['step_s']:.2f}", f"{b / j['step_s']:.2f}", f"{j['compile_s']:.0f}",
                             f"{t['peak_mb'] / 1024:.1f}", f"{j['peak_mb'] / 1024:.1f}",
                             _gb(t.get("step_peak_mb")), _gb(j.get("step_peak_mb"))])  # fmt: skip
            else:
                rows.append(
                    [
                        label,
                        b,
                        dtype,
                        f"{j['step_s']:.3f}",
                        f"{b / j['step_s']:.1f}",
                        f"{j['compile_s']:.0f}",
                        j.get("device", ""),
                    ]
                )
            print(f"done {name} {dtype}", file=sys.stderr)
    if args.device == "cpu":
        import torch
        import torchvision

        print_table(
            f"Training step (forward, the losses (4; Mask R-CNN 5), backward, SGD), CPU, {args.threads} threads"
            f"{', JAX with malloc_trim after compiling' if args.malloc_trim else ''}{_mmap_note(args)}; torchvision "
            f"{torchvision.__version__} (torch {torch.__version__}); {machine_line()}",
            [
                "model",
                "batch",
                "torchvision s/step",
                "JAX s/step",
                "ratio",
                "torchvision img/s",
                "JAX img/s",
                "JAX compile s",
                "torch peak GB",
                "JAX peak GB",
                "torch step peak GB",
                "JAX step peak GB",
            ],  # fmt: skip
            rows,
        )
    else:
        print_table(
            f"Training step on {machine_line()}",
            ["model", "batch", "dtype", "s/step", "img/s", "compile s", "device"],
            rows,
        )


if __name__ == "__main__":
    main()
