"""Accelerator benchmark: R-50-FPN, R-50-C4 and Mask R-CNN R-50-FPN training and inference throughput
on JAX's default backend.

    python benchmarks/accelerator.py [--smoke] [--out DIR] [--models fpn,c4,maskfpn] [--dtypes bfloat16,float32]

What it measures, on whatever backend `jax.default_backend()` finds (GPU, TPU or CPU):

* **train**: the real jitted training step (`frcnn_jax.training.train_step`:
  `create_train_state` + `make_train_step`: forward, RPN and box-head targets, the four
  losses, backward, SGD update), data-parallel over all local devices
  (`frcnn_jax.training.sharding.shard_train_step` / `put_batch`), at the largest batch
  per device among 16/8/4/2 that fits: the largest is tried first, and a
  RESOURCE_EXHAUSTED (out of memory) at compile or run time, or an XLA memory plan above
  the device's limit, moves on to the next smaller one.
* **infer**: the model's `__call__` (backbone, RPN, proposals, box head, post-processing),
  jitted, on one device, at batch 1 and 8.

Both in bfloat16 and float32 compute (`ModelConfig.dtype`; parameters stay float32), on
an 800x1344 canvas (images 800x1333, the COCO maximum) with synthetic data: coarse block
noise plus solid rectangles, already normalised, and 3-8 random ground-truth boxes per image
padded to 100 rows, in the batch format of `frcnn_jax.data.pipeline`; the Mask R-CNN
("maskfpn") batches add each box's mask as the pipeline crops it (`gt_masks` [B, G, 112, 112]
uint8, `gt_mask_boxes`: the solid rectangle drawn at the box, with the crop's one-cell zero
border). Parameters are `init_variables`' random initialisation (a from-scratch run's weights);
model hyperparameters are those of configs/r50_fpn_coco.py, configs/r50_c4_coco.py and
configs/maskrcnn_r50_fpn_coco.py.

Per row: img/s (all devices and per device) from the median of 5 timed steps after 3
warm-up steps (`block_until_ready` on every output, the new train state included);
compile seconds (trace + XLA compile; programs compile `--compile-workers` at a time in
threads while the next one is traced, so one program's figure includes some
contention; with a persistent compilation cache configured they are cache loads, and
the notes say so); "plan GB", the XLA memory
plan of the compiled program per device (arguments + outputs - donated + temporaries,
`Compiled.memory_analysis()`); "peak GB", the device's `memory_stats()["peak_bytes_in_use"]`
after the row. JAX's peak is a process-wide high-water mark that cannot be reset, so rows
run in increasing plan order and a row that did not raise the mark shows "<=X" (its own
peak is at most X). On CPU there are no device memory statistics: "n/a", and the process
peak RSS is printed under the table.

Sized to finish in under 8 minutes on one H100/H200: 3 + 5 steps per row, every program
compiled once (all of them in a first wave, training first) and reused for its warm-up
and timed steps, and after `--time-budget-s` (420 s) no new wave of smaller-batch
fallbacks starts (those rows are reported as SKIPPED).

The rows are printed as a table and written as markdown and JSON, after every row (a run
cut short keeps the rows it finished), to `--out`: a directory (default
benchmarks/results/) receiving accelerator-<backend>.md/.json (-smoke for --smoke), or a
file path ending in .md or .json (both files are written next to each other).

On a GPU this is meant to be compared with Detectron2's published per-V100 training
throughput: 9.5 img/s for R50-FPN and 3.6 img/s for R50-C4 (MODEL_ZOO, 16 images per
iteration on 8 V100s, 0.210 and 0.551 s/iter), and inference 0.038 / 0.102 s per image
(see /work/shared/design/REFERENCE.md); the "vs D2 V100" column is img/s per device
divided by those figures.

`--smoke`: a tiny configuration (R-18 width-8 models, 64x64 canvas, batch 2 per device
for training and 1 for inference, 1 warm-up + 2 timed steps, both architectures, both
dtypes, train and infer) that runs on CPU, so the test suite exercises exactly this code
(tests/test_benchmarks.py): under a minute on 2 cores with a warm persistent compilation
cache, a few minutes cold (compiling dominates).

Dependencies: jax, flax, optax and numpy only (and the frcnn_jax modeling/training
modules, which need no more), so it runs on a bare accelerator machine. On GPU the
allocator's preallocation defaults to 90% of device memory here
(XLA_PYTHON_CLIENT_MEM_FRACTION, unless already set) to give the batch search room.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import dataclasses
import gc
import io
import json
import os
import resource
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")  # before JAX initialises a GPU backend

import jax  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(1, REPO)  # a plain checkout (frcnn_jax not installed) works too

from _timing import machine_line, median_seconds, print_table  # noqa: E402
from frcnn_jax.modeling.config import ModelConfig, maskrcnn_r50_fpn, r50_c4, r50_fpn  # noqa: E402
from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables  # noqa: E402
from frcnn_jax.training import sharding  # noqa: E402
from frcnn_jax.training.optim import OptimConfig, learning_rate_schedule  # noqa: E402
from frcnn_jax.training.train_step import create_train_state, make_train_step  # noqa: E402

GIB = 1024**3

# Detectron2 MODEL_ZOO, per V100 (REFERENCE.md): training img/s, inference img/s (1 / s per image).
# Mask R-CNN R50-FPN 1x: 0.261 s/iter at 16 images on 8 V100s (REFERENCE.md) = 7.66 img/s per V100 (training only).
D2_V100 = {
    "fpn": {"train": 9.5, "infer": 1 / 0.038},
    "c4": {"train": 3.6, "infer": 1 / 0.102},
    "maskfpn": {"train": 16 / 0.261 / 8},
}
MASK_CROP = 112  # the host's mask crop size S of the Mask R-CNN batches (data.mask_size)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    model: dict  # ModelConfig fields, nested or dotted (`ModelConfig.from_dict`; dtype excluded)
    optim: OptimConfig


@dataclasses.dataclass(frozen=True)
class Profile:
    canvas: tuple[int, int]
    image: tuple[int, int]  # (h, w) of the image inside the canvas (the rest is zero padding)
    max_gt: int
    train_batches: tuple[int, ...]  # per device, tried in this order (largest first)
    infer_batches: tuple[int, ...]  # on one device
    warmup: int
    steps: int
    models: dict  # arch -> ModelSpec
    compare_d2: bool  # the real models: report the ratio to Detectron2's per-V100 figures
    mask_crop: int = MASK_CROP  # S of the Mask R-CNN batches' gt_masks


FULL = Profile(
    canvas=(800, 1344),
    image=(800, 1333),
    max_gt=100,
    train_batches=(16, 8, 4, 2),
    infer_batches=(1, 8),
    warmup=3,
    steps=5,
    compare_d2=True,
    models={
        # configs/r50_fpn_coco.py: torchvision's fasterrcnn_resnet50_fpn v1.
        "fpn": ModelSpec(
            "R-50-FPN",
            r50_fpn(num_classes=81).to_dict(),
            OptimConfig(base_lr=0.02, warmup_steps=500, decay_steps=(60_000, 80_000), total_steps=90_000),
        ),
        # configs/r50_c4_coco.py: maskrcnn-benchmark R-50-C4 (the ModelConfig defaults).
        "c4": ModelSpec(
            "R-50-C4",
            r50_c4(num_classes=81).to_dict(),
            OptimConfig(
                base_lr=0.01,
                bias_lr_factor=2.0,
                weight_decay=1e-4,
                warmup_steps=500,
                warmup_factor=1.0 / 3,
                decay_steps=(120_000, 160_000),
                total_steps=180_000,
            ),  # fmt: skip
        ),
        # configs/maskrcnn_r50_fpn_coco.py: torchvision's maskrcnn_resnet50_fpn v1.
        "maskfpn": ModelSpec(
            "Mask R-CNN R-50-FPN",
            maskrcnn_r50_fpn(num_classes=81).to_dict(),
            OptimConfig(
                base_lr=0.02,
                warmup_steps=1000,
                warmup_factor=1e-3,
                decay_steps=(117_280, 161_260),
                total_steps=190_580,
            ),  # fmt: skip
        ),
    },
)

_TINY = {  # dotted ModelConfig fields
    "num_classes": 9, "backbone": {"depth": 18, "width": 8, "freeze_at": 2},
    "rpn.train": {"pre_nms_top_n": 200, "post_nms_top_n": 32}, "rpn.test": {"pre_nms_top_n": 100, "post_nms_top_n": 16},
    "rpn.assigner.batch_size_per_image": 64, "roi_heads.assigner.batch_size_per_image": 16,
    "roi_heads.postprocess.detections_per_img": 10, "roi_heads.pooler.sampling_ratio": 2,
}  # fmt: skip
_TINY_OPTIM = OptimConfig(base_lr=0.01, warmup_steps=0)

_TINY_FPN = {
    **_TINY, "arch": "fpn", "backbone.fpn_channels": 16, "roi_heads.representation_size": 32,
    "roi_heads.pooler.resolution": 7, "anchors.sizes": (16.0, 32.0, 64.0, 128.0, 256.0),
}  # fmt: skip

SMOKE = Profile(
    canvas=(64, 64),
    image=(64, 56),
    max_gt=8,
    train_batches=(2, 1),
    infer_batches=(1,),
    warmup=1,
    steps=2,
    compare_d2=False,
    mask_crop=16,
    models={
        "fpn": ModelSpec("R-18-FPN w8", _TINY_FPN, _TINY_OPTIM),
        "c4": ModelSpec(
            "R-18-C4 w8",
            {**_TINY, "arch": "c4", "roi_heads.pooler.resolution": 6, "anchors.sizes": (16.0, 32.0, 64.0)},
            _TINY_OPTIM,
        ),
        "maskfpn": ModelSpec(
            "R-18-FPN w8 Mask R-CNN",
            {
                **_TINY_FPN,
                "mask": {
                    "enabled": True,
                    "pooler": {"resolution": 7, "sampling_ratio": 2},
                    "conv_channels": (16, 16),
                    "predictor_channels": 16,
                },
            },  # fmt: skip
            _TINY_OPTIM,
        ),
    },
)


# --- small helpers -----------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    """XLA's out-of-memory error (jax.errors.JaxRuntimeError RESOURCE_EXHAUSTED), at compile or run time."""
    msg = str(exc)
    return "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()


def plan_bytes(compiled) -> int | None:
    """Per-device memory the compiled program needs: arguments + outputs - donated + temporaries."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend / version implements it
        return None
    if isinstance(ma, (list, tuple)):
        ma = ma[0] if ma else None
    if ma is None:
        return None
    try:
        return int(
            ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
            + getattr(ma, "generated_code_size_in_bytes", 0)
        )  # fmt: skip
    except AttributeError:
        return None


def memory_stats(devices) -> list[dict] | None:
    stats = []
    for d in devices:
        try:
            s = d.memory_stats()
        except Exception:  # noqa: BLE001
            s = None
        if not s:
            return None
        stats.append(s)
    return stats


def device_peak(devices) -> int | None:
    stats = memory_stats(devices)
    if stats is None or any("peak_bytes_in_use" not in s for s in stats):
        return None
    return max(int(s["peak_bytes_in_use"]) for s in stats)


def device_limit(devices) -> int | None:
    stats = memory_stats(devices)
    if stats is None or any("bytes_limit" not in s for s in stats):
        return None
    return min(int(s["bytes_limit"]) for s in stats)


def host_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def synthetic_batch(
    batch: int, canvas, image_hw, max_gt: int, num_classes: int, seed: int = 0, mask_crop: int = 0
) -> dict:
    """A training batch like frcnn_jax.data.pipeline's: normalised images, GT padded to max_gt rows.

    Images: coarse block noise plus a solid rectangle at each box (so the RPN has edges to
    find), zero outside image_hw. Labels 1..num_classes (foreground classes). mask_crop S > 0
    adds the Mask R-CNN fields as `data.masks` batches them: gt_masks uint8 [B, max_gt, S, S]
    (each rectangle's mask: 255 inside, the crop's one-cell border 0) and gt_mask_boxes float32
    [B, max_gt, 4] (the box widened by one cell on each side), zeros in padding rows.
    """
    rng = np.random.default_rng(seed)
    (hc, wc), (h, w) = canvas, image_hw
    cell = max(1, min(h, w) // 16)
    coarse = rng.standard_normal((batch, -(-h // cell), -(-w // cell), 3), dtype=np.float32)
    images = np.zeros((batch, hc, wc, 3), np.float32)
    images[:, :h, :w] = np.repeat(np.repeat(coarse, cell, axis=1), cell, axis=2)[:, :h, :w] * 0.6
    boxes = np.zeros((batch, max_gt, 4), np.float32)
    labels = np.zeros((batch, max_gt), np.int32)
    valid = np.zeros((batch, max_gt), bool)
    for i in range(batch):
        n = min(int(rng.integers(3, 9)), max_gt)
        wh = rng.uniform(0.08, 0.45, (n, 2)) * [w, h]
        xy = rng.uniform(0, 1, (n, 2)) * ([w, h] - wh)
        for j, ((x1, y1), (bw, bh)) in enumerate(zip(xy, wh)):
            boxes[i, j] = [x1, y1, x1 + bw, y1 + bh]
            labels[i, j] = rng.integers(1, num_classes + 1)
            valid[i, j] = True
            images[i, int(y1) : int(y1 + bh), int(x1) : int(x1 + bw)] = rng.normal(0, 1.2, 3)
    out = {
        "image": images,
        "image_size": np.tile(np.array([h, w], np.int32), (batch, 1)),
        "boxes": boxes,
        "labels": labels,
        "gt_valid": valid,
        "is_crowd": np.zeros((batch, max_gt), bool),
    }
    if mask_crop:
        s = int(mask_crop)
        crop = np.zeros((s, s), np.uint8)
        crop[1:-1, 1:-1] = 255
        margin = (boxes[..., 2:] - boxes[..., :2]) / (s - 2)  # [B, G, 2] one cell (x, y)
        out["gt_masks"] = np.where(valid[:, :, None, None], crop, 0).astype(np.uint8)
        out["gt_mask_boxes"] = np.where(
            valid[..., None], np.concatenate([boxes[..., :2] - margin, boxes[..., 2:] + margin], -1), 0
        ).astype(np.float32)
    return out


def abstract(tree):
    """Shapes and dtypes only (lowering needs no device memory)."""
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype), tree
    )


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# --- the benchmark -----------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One line of the table: (arch, dtype, mode) at the first batch in `candidates` that fits."""

    arch: str
    dtype: str
    mode: str  # "train" | "infer"
    candidates: tuple[int, ...]
    tried: list = dataclasses.field(default_factory=list)  # (batch, outcome) of failed attempts
    result: dict | None = None

    @property
    def next_batch(self) -> int:
        return self.candidates[len(self.tried)]


@dataclasses.dataclass
class Job:
    row: Row
    batch: int  # per device
    lowered: Any = None
    compiled: Any = None
    compile_s: float = 0.0
    plan: int | None = None
    failure: str | None = None  # "oom: ..." or "error: ..."


@dataclasses.dataclass
class _ArchSetup:
    variables: Any  # host (numpy) {"params", "frozen"}, float32, shared by both dtypes
    abstract_state: Any
    tx: Any
    model_f32: FasterRCNN


class Benchmark:
    def __init__(self, profile: Profile, archs, dtypes, modes=("train", "infer"), *, compile_workers=1,
                 mem_limit_bytes=None, model_overrides=None, time_budget_s=None, log=None):  # fmt: skip
        self.profile = profile
        self.archs, self.dtypes, self.modes = list(archs), list(dtypes), list(modes)
        self.compile_workers = max(1, int(compile_workers))
        self.mem_limit_bytes = mem_limit_bytes
        self.time_budget_s = time_budget_s  # no new compile wave (smaller batches) after this
        self.overrides = dict(model_overrides or {})
        self.log = log or (lambda msg: None)
        self.mesh = sharding.data_mesh()
        self.devices = list(self.mesh.devices.flat)
        self.n_devices = len(self.devices)
        self._setups: dict[str, _ArchSetup] = {}
        self._batches: dict[int, dict] = {}
        self.rows = [
            Row(a, d, m, profile.train_batches if m == "train" else (b,))
            for a in self.archs
            for d in self.dtypes
            for m in self.modes
            for b in (profile.train_batches[:1] if m == "train" else profile.infer_batches)
        ]
        self.on_row_done = lambda row: None

    # -- building blocks (overridable, e.g. by tests) ------------------------------------------
    def model(self, arch: str, dtype: str) -> FasterRCNN:
        spec = self.profile.models[arch]
        return FasterRCNN(ModelConfig.from_dict({**spec.model, **self.overrides, "dtype": dtype}))

    def setup(self, arch: str) -> _ArchSetup:
        if arch not in self._setups:
            t0 = time.perf_counter()
            model = self.model(arch, "float32")
            variables = jax.device_get(init_variables(model, jax.random.key(0)))
            state, tx = create_train_state(model, variables, self.profile.models[arch].optim, 0)
            self._setups[arch] = _ArchSetup(variables, abstract(state), tx, model)
            del state
            self.log(f"initialised {self.profile.models[arch].name} in {time.perf_counter() - t0:.1f} s")
        return self._setups[arch]

    def host_batch(self, global_batch: int) -> dict:
        if global_batch not in self._batches:
            p = self.profile
            classes = min(
                int(self.overrides.get("num_classes", s.model.get("num_classes", 81))) for s in p.models.values()
            )
            masks = any(bool(p.models[a].model.get("mask", {}).get("enabled")) for a in self.archs)
            self._batches[global_batch] = synthetic_batch(
                global_batch, p.canvas, p.image, p.max_gt, classes - 1, mask_crop=p.mask_crop if masks else 0
            )
        return self._batches[global_batch]

    def lower(self, job: Job):
        row, s = job.row, self.setup(job.row.arch)
        model = self.model(row.arch, row.dtype)
        if row.mode == "train":
            step = make_train_step(model, s.tx, learning_rate_schedule(self.profile.models[row.arch].optim))
            jitted = sharding.shard_train_step(step, self.mesh, s.abstract_state)
            batch = abstract(self.host_batch(job.batch * self.n_devices))
            return jitted.lower(s.abstract_state, batch)
        jitted = jax.jit(lambda v, x, sz: model.apply(v, x, sz))
        hc, wc = self.profile.canvas
        return jitted.lower(
            abstract(s.variables),
            jax.ShapeDtypeStruct((job.batch, hc, wc, 3), np.float32),
            jax.ShapeDtypeStruct((job.batch, 2), np.int32),
        )

    def compile(self, lowered):
        return lowered.compile()

    def execute(self, job: Job) -> dict:
        """Warm-up + timed steps of a compiled job -> measurements (raises on OOM)."""
        row, p, s = job.row, self.profile, self.setup(job.row.arch)
        if row.mode == "train":
            devices = self.devices
            state, _ = create_train_state(s.model_f32, s.variables, p.models[row.arch].optim, 0)
            state = jax.device_put(state, sharding.replicated(self.mesh))
            batch = sharding.put_batch(self.host_batch(job.batch * self.n_devices), self.mesh)
            carry = {"state": state}
            del state

            def one_step():
                carry["state"], carry["metrics"] = job.compiled(carry["state"], batch)
                return carry["state"], carry["metrics"]

            seconds = median_seconds(one_step, repeats=p.steps, warmup=p.warmup)
            extra = {"loss": float(carry["metrics"]["loss"])}
            images = job.batch * self.n_devices
            del carry, batch
        else:
            devices = self.devices[:1]
            host = self.host_batch(job.batch)
            args = jax.device_put((s.variables, host["image"], host["image_size"]), devices[0])
            seconds = median_seconds(job.compiled, *args, repeats=p.steps, warmup=p.warmup)
            out = job.compiled(*args)
            extra = {"detections_per_image": float(np.asarray(out["valid"]).sum()) / job.batch}
            images = job.batch
            del out, args
        return {"seconds": seconds, "images": images, "devices": len(devices), **extra}

    # -- driver ----------------------------------------------------------------------------------
    def _lower_and_compile(self, jobs: list[Job]):
        """Lowers the jobs one by one (tracing holds the GIL) and compiles each in the pool as soon as it is lowered.

        XLA compiles without the GIL, so `compile_workers` programs compile at once, while
        the main thread traces the next one.
        """

        def compile_one(job: Job):
            t0 = time.perf_counter()
            try:
                job.compiled = self.compile(job.lowered)
                job.plan = plan_bytes(job.compiled)
            except Exception as e:  # noqa: BLE001
                job.failure = ("oom: " if is_oom(e) else "error: ") + f"{type(e).__name__}: {e}"[:500]
                if not is_oom(e):
                    self.log(f"compiling {self.label(job)} failed:\n{traceback.format_exc()}")
            job.compile_s += time.perf_counter() - t0
            job.lowered = None
            plan = f", plan {job.plan / GIB:.2f} GB" if job.plan is not None else ""
            self.log(
                f"compiled {self.label(job)} in {job.compile_s:.1f} s{plan}"
                + (f" ({job.failure[:80]})" if job.failure else "")
            )

        with concurrent.futures.ThreadPoolExecutor(self.compile_workers) as pool:
            futures = []
            for job in jobs:
                try:
                    self.setup(job.row.arch)  # parameter initialisation is not part of the compile time
                    t0 = time.perf_counter()
                    job.lowered = self.lower(job)
                    job.compile_s = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001
                    job.failure = ("oom: " if is_oom(e) else "error: ") + f"{type(e).__name__}: {e}"[:500]
                    self.log(f"lowering {self.label(job)} failed:\n{traceback.format_exc()}")
                    continue
                futures.append(pool.submit(compile_one, job))
            for f in futures:
                f.result()

    def label(self, job: Job) -> str:
        r = job.row
        return f"{self.profile.models[r.arch].name} {r.dtype} {r.mode} batch {job.batch}/device"

    def _limit(self, devices) -> int | None:
        limits = [x for x in (device_limit(devices), self.mem_limit_bytes) if x is not None]
        return min(limits) if limits else None

    def _run_job(self, job: Job):
        row = job.row
        devices = self.devices if row.mode == "train" else self.devices[:1]
        limit = self._limit(devices)
        if job.failure is None and job.plan is not None and limit is not None and job.plan > limit:
            job.failure = f"oom: XLA plan {job.plan / GIB:.2f} GB > limit {limit / GIB:.2f} GB (not run)"
        if job.failure is None:
            peak0 = device_peak(devices)
            try:
                m = self.execute(job)
            except Exception as e:  # noqa: BLE001
                job.failure = ("oom: " if is_oom(e) else "error: ") + f"{type(e).__name__}: {e}"[:500]
                if not is_oom(e):
                    self.log(f"running {self.label(job)} failed:\n{traceback.format_exc()}")
            else:
                peak1 = device_peak(devices)
                row.result = self._result(row, job, m, peak0, peak1)
                self.log(f"ran {self.label(job)}: {row.result['img_s']:.2f} img/s")
        job.compiled = None
        gc.collect()
        if job.failure is not None:
            self.log(f"{self.label(job)}: {job.failure[:200]}")
            row.tried.append((job.batch, job.failure))
            if job.failure.startswith("error") or len(row.tried) == len(row.candidates):
                row.result = self._result(row, job, None, None, None)
        if row.result is not None:
            self.on_row_done(row)

    def _result(self, row: Row, job: Job, m, peak0, peak1) -> dict:
        spec = self.profile.models[row.arch]
        res = {
            "model": spec.name, "arch": row.arch, "dtype": row.dtype, "mode": row.mode,
            "devices": self.n_devices if row.mode == "train" else 1, "batch_per_device": job.batch,
            "tried": [{"batch_per_device": b, "outcome": o} for b, o in row.tried],
        }  # fmt: skip
        if m is None:
            last = row.tried[-1][1] if row.tried else "error"
            res.update(status="oom" if last.startswith("oom") else "error", error=last)
            return res
        img_s = m["images"] / m["seconds"]
        ref = D2_V100[row.arch].get(row.mode) if self.profile.compare_d2 else None
        res.update(
            status="ok", global_batch=m["images"], step_s=m["seconds"], img_s=img_s, img_s_per_device=img_s / m["devices"],
            vs_d2_v100=(img_s / m["devices"] / ref) if ref else None, compile_s=job.compile_s,
            plan_gb=None if job.plan is None else job.plan / GIB,
            peak_gb=None if peak1 is None else peak1 / GIB,
            peak_is_exact=None if peak1 is None else bool(peak0 is None or peak1 > peak0),
            **{k: v for k, v in m.items() if k not in ("seconds", "images", "devices")},
        )  # fmt: skip
        return res

    def run(self) -> list[Row]:
        wave, t_start = 0, time.perf_counter()
        while True:
            pending = [r for r in self.rows if r.result is None]
            if not pending:
                return self.rows
            if wave and self.time_budget_s and time.perf_counter() - t_start > self.time_budget_s:
                for r in pending:
                    r.result = self._result(r, Job(r, r.next_batch), None, None, None)
                    r.result.update(status="skipped", error=f"time budget of {self.time_budget_s:.0f} s spent")
                    self.log(f"skipping {self.profile.models[r.arch].name} {r.dtype} {r.mode}: time budget spent")
                    self.on_row_done(r)
                return self.rows
            wave += 1
            # Training programs first: they take longest to compile.
            jobs = [Job(r, r.next_batch) for r in sorted(pending, key=lambda r: r.mode != "train")]
            self.log(f"wave {wave}: compiling {len(jobs)} program(s), {self.compile_workers} at a time")
            self._lower_and_compile(jobs)
            # Increasing memory plan: most rows then raise the peak high-water mark (exact peaks).
            for job in sorted(jobs, key=lambda j: (j.plan is None, j.plan or 0)):
                self._run_job(job)

    # -- reporting -------------------------------------------------------------------------------
    HEADER = ["model", "dtype", "mode", "devices", "batch/dev", "img/s", "img/s/dev", "ms/step", "compile s",
              "plan GB", "peak GB", "vs D2 V100", "note"]  # fmt: skip

    def table_rows(self) -> list[list[str]]:
        out = []
        for row in self.rows:
            r = row.result
            if r is None:
                continue
            oom = [str(t["batch_per_device"]) for t in r["tried"] if t["outcome"].startswith("oom")]
            note = f"OOM at {', '.join(oom)}" if oom else ""
            if r["status"] != "ok":
                why = "; ".join(x for x in (note, r.get("error", "") if r["status"] != "oom" else "") if x)
                out.append([r["model"], r["dtype"], r["mode"], r["devices"], "-", r["status"].upper(), "-", "-", "-",
                            "-", "-", "-", why[:120]])  # fmt: skip
                continue
            peak = (
                "n/a"
                if r["peak_gb"] is None
                else (f"{r['peak_gb']:.2f}" if r["peak_is_exact"] else f"<={r['peak_gb']:.2f}")
            )
            out.append([
                r["model"], r["dtype"], r["mode"], r["devices"], r["batch_per_device"], _num(r["img_s"]),
                _num(r["img_s_per_device"]), f"{r['step_s'] * 1000:.1f}", f"{r['compile_s']:.1f}",
                "n/a" if r["plan_gb"] is None else f"{r['plan_gb']:.2f}", peak,
                "-" if r["vs_d2_v100"] is None else f"{r['vs_d2_v100']:.2f}x", note,
            ])  # fmt: skip
        return out


def _num(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3g}"


def title(bench: Benchmark, smoke: bool) -> str:
    p = bench.profile
    return (
        f"Faster / Mask R-CNN {'SMOKE (tiny models) ' if smoke else ''}on {jax.default_backend()}, "
        f"canvas {p.canvas[0]}x{p.canvas[1]}: train = jitted train step, data-parallel over "
        f"{bench.n_devices} device(s); infer = jitted forward on 1 device; "
        f"median of {p.steps} steps after {p.warmup} warm-up; {machine_line()}"
    )


def notes(bench: Benchmark, smoke: bool, elapsed: float) -> list[str]:
    cache = jax.config.jax_compilation_cache_dir
    peak_note = (
        "peak GB: device peak_bytes_in_use after the row ('<=X': the row did not raise the process's high-water mark)."
        if device_peak(bench.devices[:1]) is not None
        else f"peak GB: n/a (no device memory statistics on {jax.default_backend()}); "
        f"process peak RSS (host, whole run): {host_peak_rss_bytes() / GIB:.2f} GB."
    )
    out = [
        "plan GB: XLA memory plan of the compiled program per device (arguments + outputs - donated + temporaries).",
        peak_note,
        f"compile s: trace + XLA compile, {bench.compile_workers} program(s) compiling at a time"
        + (f"; persistent compilation cache ON ({cache}): figures may be cache loads." if cache else "."),
        f"train: per-device batches tried largest first among {', '.join(map(str, bench.profile.train_batches))}; "
        "note: those that did not fit (RESOURCE_EXHAUSTED at compile or run time, or XLA plan above the device limit).",
    ]
    if not smoke:
        out.append(
            "vs D2 V100: img/s per device / Detectron2 per-V100 (train 9.5 img/s R50-FPN, 3.6 R50-C4, "
            "7.66 Mask R-CNN R50-FPN; inference 1/0.038 and 1/0.102 img/s; /work/shared/design/REFERENCE.md)."
        )
    out.append(f"Total run time {elapsed:.0f} s.")
    return out


def output_paths(out: str | None, backend: str, smoke: bool) -> tuple[str, str]:
    stem_name = f"accelerator-{backend}{'-smoke' if smoke else ''}"
    if out and os.path.splitext(out)[1] in (".md", ".json"):
        stem = os.path.splitext(out)[0]
    else:
        stem = os.path.join(out or os.path.join(HERE, "results"), stem_name)
    return stem + ".md", stem + ".json"


def write_outputs(bench: Benchmark, args, elapsed: float, *, final: bool, stdout: bool = False):
    ttl, header, rows = title(bench, args.smoke), Benchmark.HEADER, bench.table_rows()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_table(ttl, header, rows)
    text = buf.getvalue()
    note_lines = notes(bench, args.smoke, elapsed)
    if stdout:
        print(text + "\n" + "\n".join(note_lines))
    md_path, json_path = output_paths(args.out, jax.default_backend(), args.smoke)
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    with open(md_path, "w") as f:
        f.write("# Accelerator benchmark" + (" (smoke)" if args.smoke else "") + ("" if final else " (partial)") + "\n")
        f.write(text + "\n" + "".join(f"- {n}\n" for n in note_lines))
    p = bench.profile
    doc = {
        "schema": 1, "final": final, "smoke": args.smoke, "backend": jax.default_backend(), "machine": machine_line(),
        "jax": jax.__version__, "devices": bench.n_devices, "device_kind": bench.devices[0].device_kind,
        "canvas": list(p.canvas), "image": list(p.image), "max_gt": p.max_gt, "warmup": p.warmup, "steps": p.steps,
        "compile_workers": bench.compile_workers, "compilation_cache": jax.config.jax_compilation_cache_dir or None,
        "host_peak_rss_gb": host_peak_rss_bytes() / GIB, "elapsed_s": elapsed, "reference_d2_v100_img_s": D2_V100,
        "title": ttl, "header": header, "rows": [r.result for r in bench.rows if r.result is not None],
    }  # fmt: skip
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
    return md_path, json_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models and sizes (CPU, test suite)")
    p.add_argument("--out", help="output directory, or a .md/.json path (default: benchmarks/results/)")
    p.add_argument("--models", default="fpn,c4,maskfpn", help="comma-separated: fpn, c4, maskfpn (Mask R-CNN)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16, float32")
    p.add_argument("--modes", default="train,infer", help="comma-separated: train, infer")
    p.add_argument("--train-batches", help="per-device training batches to try, largest first (default 16,8,4,2)")
    p.add_argument("--infer-batches", help="inference batches (default 1,8)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default 3; smoke 1)")
    p.add_argument("--steps", type=int, help="timed steps (default 5; smoke 2)")
    p.add_argument("--compile-workers", type=int, default=0,
                   help="programs compiled concurrently (0: 1 on CPU, else min(8, cores // 2))")  # fmt: skip
    p.add_argument("--mem-limit-gb", type=float, help="treat programs planning more than this per device as OOM")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no fallback wave (smaller batches) after this many seconds (default 420; smoke: none)")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field for every model (e.g. --set remat=backbone, --set rpn.nms_thresh=0.6)")  # fmt: skip
    args = p.parse_args(argv)

    profile = SMOKE if args.smoke else FULL
    changes = {}
    if args.train_batches:
        changes["train_batches"] = tuple(sorted({int(b) for b in args.train_batches.split(",")}, reverse=True))
    if args.infer_batches:
        changes["infer_batches"] = tuple(int(b) for b in args.infer_batches.split(","))
    if args.warmup is not None:
        changes["warmup"] = max(1, args.warmup)
    if args.steps is not None:
        changes["steps"] = max(1, args.steps)
    profile = dataclasses.replace(profile, **changes)
    archs = [a for a in args.models.split(",") if a]
    dtypes = [d for d in args.dtypes.split(",") if d]
    modes = [m for m in args.modes.split(",") if m]
    for a in archs:
        if a not in profile.models:
            p.error(f"--models: unknown {a!r} (choose from {sorted(profile.models)})")
    for d in dtypes:
        if d not in ("bfloat16", "float32"):
            p.error(f"--dtypes: unknown {d!r}")
    for m in modes:
        if m not in ("train", "infer"):
            p.error(f"--modes: unknown {m!r}")
    overrides = {}
    for item in args.set:
        k, sep, v = item.partition("=")
        if not sep:
            p.error(f"--set expects FIELD=VALUE, got {item!r}")
        overrides[k] = parse_value(v)
    workers = args.compile_workers or (
        1 if jax.default_backend() == "cpu" else min(8, max(1, (os.cpu_count() or 2) // 2))
    )

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    bench = Benchmark(
        profile, archs, dtypes, modes, compile_workers=workers,
        mem_limit_bytes=None if args.mem_limit_gb is None else int(args.mem_limit_gb * GIB),
        model_overrides=overrides, log=log,
        time_budget_s=args.time_budget_s if args.time_budget_s is not None else (None if args.smoke else 420.0),
    )  # fmt: skip
    log(f"{machine_line()}; {bench.n_devices} device(s); {len(bench.rows)} rows")
    bench.on_row_done = lambda row: write_outputs(bench, args, time.perf_counter() - t_start, final=False)
    bench.run()
    md_path, json_path = write_outputs(bench, args, time.perf_counter() - t_start, final=True, stdout=True)
    log(f"wrote {md_path} and {json_path}")
    failed = [r for r in bench.rows if r.result is None or r.result["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
