"""Benchmark pasting Mask R-CNN masks into the original image: frcnn_jax.host_masks vs torchvision.

    python benchmarks/mask_paste.py [--repeats 3] [--masks 100] [--torch-threads 1] [--smoke]

Both sides paste K masks (M = 28, probabilities) of detections into the image and
threshold them at 0.5, giving [K, H, W] bool: ours is `host_masks.paste_masks`,
torchvision's is `roi_heads.paste_masks_in_image(...) > 0.5` (a float [K, 1, H, W]
result first). Boxes are detection-like (log-uniform sides from 3 % to 60 % of the
image, clipped to it). Printed: a markdown table of median seconds per image and the
ratio ours / torchvision (< 1: ours is faster), then the RLE path
(`host_masks.iter_mask_rles`: one COCO RLE per detection, never [K, H, W]) with its
time and its peak Python-heap memory (tracemalloc; numpy buffers are traced), beside
the [K, H, W] bool result's size for scale.

Both sides run single-threaded by default (ours is numpy; `--torch-threads N` gives torch
N threads: on a busy shared machine its OpenMP threads spin and it gets ~10x slower).

--smoke: tiny images, 10 masks, one repeat (both sides; the test suite runs it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), ".."))  # the repository: a plain checkout works too
from _timing import machine_line, print_table  # noqa: E402
from frcnn_jax import host_masks  # noqa: E402


def detection_boxes(rng, k, height, width):
    """[k, 4] float32 (x1, y1, x2, y2): log-uniform sides 3-60 % of the image, clipped to it."""
    side = np.exp(rng.uniform(np.log(0.03), np.log(0.6), (k, 2))) * (width, height)
    centre = rng.uniform(0, 1, (k, 2)) * (width, height)
    boxes = np.concatenate([centre - side / 2, centre + side / 2], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes.astype(np.float32)


def blob_masks(rng, k, m=28):
    """[k, m, m] float32 smooth probabilities: a soft disc per mask (about half foreground)."""
    yy, xx = np.mgrid[0:m, 0:m] / (m - 1)
    cx, cy, r = rng.uniform(0.3, 0.7, (3, k, 1, 1))
    return (1 / (1 + np.exp(-30 * (r - np.hypot(xx - cx, yy - cy))))).astype(np.float32)


def median_seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_bytes(fn):
    """Peak traced allocation (bytes) while fn() runs."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def cpu_line() -> str:
    """CPU model, whether it has AVX-512, and the instruction set torch's kernels use."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "x86_64", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return f"{model}, AVX-512: {'yes' if 'avx512f' in flags else 'no'}"


def bench_image(rng, k, height, width, repeats, torch, paste_masks_in_image):
    """One image size: (paste row, RLE row) of the tables."""
    boxes = detection_boxes(rng, k, height, width)
    masks = blob_masks(rng, k)
    masks_t, boxes_t = torch.from_numpy(masks)[:, None], torch.from_numpy(boxes)

    def ours():
        return host_masks.paste_masks(masks, boxes, (height, width))

    def theirs():
        return paste_masks_in_image(masks_t, boxes_t, (height, width))[:, 0] > 0.5

    def rles():
        return list(host_masks.iter_mask_rles(masks, boxes, (height, width)))

    same = np.array_equal(ours(), theirs().numpy())
    t_ours, t_tv = median_seconds(ours, repeats), median_seconds(theirs, repeats)
    t_rle = median_seconds(rles, repeats)
    peak_rle = peak_bytes(rles)
    image = f"{width}x{height}"
    row = [image, k, f"{t_ours:.4f}", f"{t_tv:.4f}", f"{t_ours / t_tv:.2f}", "yes" if same else "NO"]
    rle_row = [image, k, f"{t_rle:.4f}", f"{peak_rle / 2**20:.1f}", f"{k * height * width / 2**20:.1f}"]
    return row, rle_row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch's threads (1: like ours; OpenMP threads spin on a busy machine)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny images, 10 masks, one repeat (for the tests)")
    args = parser.parse_args(argv)

    from importlib import metadata

    import torch
    import torchvision
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    torch.set_num_threads(args.torch_threads)
    sizes = [(48, 64), (200, 300)] if args.smoke else [(480, 640), (2000, 3000)]
    k = 10 if args.smoke else args.masks
    repeats = 1 if args.smoke else args.repeats
    rng = np.random.default_rng(0)

    rows, rle_rows = [], []
    for height, width in sizes:
        row, rle_row = bench_image(rng, k, height, width, repeats, torch, paste_masks_in_image)
        rows.append(row)
        rle_rows.append(rle_row)

    print(f"# Mask paste benchmark ({'smoke' if args.smoke else 'full'})")
    print()
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {cpu_line()}; {machine_line()}")
    print(
        f"numpy {np.__version__}, torch {torch.__version__} (threads: {torch.get_num_threads()}, kernels "
        f"{torch.backends.cpu.get_cpu_capability()}), torchvision {torchvision.__version__}, "
        f"pycocotools {metadata.version('pycocotools')}; median of {repeats} after a warm-up"
    )
    print_table(
        f"{k} masks (M = 28) pasted + thresholded at 0.5 -> [K, H, W] bool, seconds per image",
        ["image (WxH)", "masks", "ours", "torchvision", "ours / tv", "equal"],
        rows,
    )
    print_table(
        "RLE path (host_masks.iter_mask_rles: one detection at a time), seconds per image and peak traced memory",
        ["image (WxH)", "masks", "ours RLE s", "peak MiB", "[K, H, W] bool MiB"],
        rle_rows,
    )


if __name__ == "__main__":
    main()
