"""Benchmark the core ops: JAX (jitted, compile excluded) vs torchvision on the same machine.

    python benchmarks/ops.py [--repeats 5] [--torch-repeats 3] [--only nms,roi_align,coder]
    python benchmarks/ops.py --smoke    # tiny sizes, one repeat (the test suite runs it)

Prints a markdown table: median seconds per call and the ratio JAX / torchvision
(< 1 means JAX is faster). Inputs are proposal-like: NMS boxes cluster around
objects; ROIs have log-uniform sizes 16-600 px on an 800x1066 image (C4 map
[50, 67, 1024], stride 16). Backward passes use a random cotangent and include
the forward pass.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), ".."))  # the repository: a plain checkout works too
from _timing import compile_seconds, machine_line, median_seconds, print_table  # noqa: E402
from frcnn_jax import ops  # noqa: E402
from frcnn_jax.testing.inputs import clustered_boxes  # noqa: E402  (shared with the tests)


def proposal_rois(rng, n, height=800, width=1066):
    wh = np.exp(rng.uniform(np.log(16), np.log(600), (n, 2)))
    c = rng.uniform([0, 0], [width, height], (n, 2))
    b = np.concatenate([c - wh / 2, c + wh / 2], axis=1)
    b[:, 0::2] = b[:, 0::2].clip(0, width)
    b[:, 1::2] = b[:, 1::2].clip(0, height)
    return b.astype(np.float32)


# Input sizes: NMS box counts, ROIAlign feature map [H, W, C] and ROI counts, box-coder count.
FULL = {"nms": (1000, 6000, 12000), "feature": (50, 67, 1024), "rois": (512, 1000), "coder": 100_000}
SMOKE = {"nms": (200,), "feature": (13, 17, 64), "rois": (32,), "coder": 1000}


def bench_nms(rng, args, torch, tv, rows):
    for n in args.sizes["nms"]:
        boxes = clustered_boxes(rng, n)
        scores = rng.permutation(n).astype(np.float32) / n
        f = jax.jit(lambda b, s, n=n: ops.nms(b, s, 0.7, n))
        c = compile_seconds(f, boxes, scores)
        t_jax = median_seconds(f, boxes, scores, repeats=args.repeats)
        tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
        t_tv = median_seconds(lambda tb=tb, ts=ts: tv.ops.nms(tb, ts, 0.7), repeats=args.repeats)
        kept = int((np.asarray(f(boxes, scores)) >= 0).sum())
        rows.append(["nms iou 0.7", f"{n} boxes ({kept} kept)", t_jax, t_tv, c])


def bench_roi_align(rng, args, torch, tv, rows):
    fh, fw, fc = args.sizes["feature"]
    feat = rng.standard_normal((fh, fw, fc)).astype(np.float32)
    feat_t = torch.from_numpy(np.ascontiguousarray(feat.transpose(2, 0, 1)))[None]
    shape = f"[{fh},{fw},{fc}]"
    for r in args.sizes["rois"]:
        boxes = proposal_rois(rng, r, height=fh * 16, width=fw * 16)
        rois_t = torch.cat([torch.zeros(r, 1), torch.from_numpy(boxes)], 1)
        cot = rng.standard_normal((r, 14, 14, fc)).astype(np.float32)
        cot_t = torch.from_numpy(np.ascontiguousarray(cot.transpose(0, 3, 1, 2)))
        for sr in [0, 2]:
            fwd = jax.jit(lambda f, b, sr=sr: ops.roi_align(f, b, 14, 1 / 16, sr, False))

            def fwd_bwd(f, b, g, sr=sr):
                out, vjp = jax.vjp(lambda x: ops.roi_align(x, b, 14, 1 / 16, sr, False), f)
                return out, vjp(g)[0]

            fb = jax.jit(fwd_bwd)
            c = compile_seconds(fwd, feat, boxes)
            t_jax = median_seconds(fwd, feat, boxes, repeats=args.repeats)
            t_tv = median_seconds(
                lambda rois_t=rois_t, sr=sr: tv.ops.roi_align(feat_t, rois_t, 14, 1 / 16, sr, False),
                repeats=args.torch_repeats,
            )
            rows.append([f"roi_align fwd sr={sr}", f"{r} rois 14x14, {shape}", t_jax, t_tv, c])

            c = compile_seconds(fb, feat, boxes, cot)
            t_jax = median_seconds(fb, feat, boxes, cot, repeats=args.repeats)
            ft = feat_t.clone().requires_grad_(True)

            def tv_fb(ft=ft, rois_t=rois_t, sr=sr, cot_t=cot_t):
                ft.grad = None
                out = tv.ops.roi_align(ft, rois_t, 14, 1 / 16, sr, False)
                out.backward(cot_t)

            t_tv = median_seconds(tv_fb, repeats=args.torch_repeats)
            rows.append([f"roi_align fwd+bwd sr={sr}", f"{r} rois 14x14, {shape}", t_jax, t_tv, c])


def bench_coder(rng, args, torch, tv, rows):
    from torchvision.models.detection._utils import BoxCoder

    n = args.sizes["coder"]
    anchors = proposal_rois(rng, n)
    anchors[:, 2:] += 1.0
    gt = proposal_rois(rng, n)
    gt[:, 2:] += 1.0
    deltas = rng.normal(0, 0.5, (n, 4)).astype(np.float32)
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    ta, tg, td = torch.from_numpy(anchors), torch.from_numpy(gt), torch.from_numpy(deltas)
    enc = jax.jit(lambda g, a: ops.encode_boxes(g, a, (10.0, 10.0, 5.0, 5.0)))
    dec = jax.jit(lambda d, a: ops.decode_boxes(d, a, (10.0, 10.0, 5.0, 5.0)))
    rows.append(
        [
            "encode_boxes",
            f"{n} boxes",
            median_seconds(enc, gt, anchors, repeats=args.repeats),
            median_seconds(lambda: coder.encode_single(tg, ta), repeats=args.repeats),
            compile_seconds(enc, gt, anchors),
        ]
    )
    rows.append(
        [
            "decode_boxes",
            f"{n} boxes",
            median_seconds(dec, deltas, anchors, repeats=args.repeats),
            median_seconds(lambda: coder.decode_single(td, ta), repeats=args.repeats),
            compile_seconds(dec, deltas, anchors),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats for fast calls")
    parser.add_argument("--torch-repeats", type=int, default=3, help="timed repeats for slow torchvision roi_align")
    parser.add_argument("--only", default="nms,roi_align,coder", help="comma-separated subset")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (checks the script runs)")
    args = parser.parse_args(argv)
    args.sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.repeats = args.torch_repeats = 1
    try:
        import torch
        import torchvision as tv
    except ImportError:
        sys.exit("benchmarks/ops.py compares against torchvision: pip install -e '.[torch]'")
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    only = set(args.only.split(","))
    if "nms" in only:
        bench_nms(rng, args, torch, tv, rows)
    if "roi_align" in only:
        bench_roi_align(rng, args, torch, tv, rows)
    if "coder" in only:
        bench_coder(rng, args, torch, tv, rows)
    table = [
        [op, size, f"{tj * 1e3:.2f}", f"{tt * 1e3:.2f}", f"{tj / tt:.2f}x", f"{c:.1f}"] for op, size, tj, tt, c in rows
    ]
    print_table(
        f"frcnn_jax ops vs torchvision {tv.__version__} (torch {torch.__version__}, {args.threads} threads); "
        f"{machine_line()}",
        ["op", "input", "JAX ms", "torchvision ms", "ratio", "JAX compile s"],
        table,
    )


if __name__ == "__main__":
    main()
