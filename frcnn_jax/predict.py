"""Run a detector on image files or folders of photos and draw what it sees.

    python -m frcnn_jax.predict --checkpoint DIR INPUT [INPUT ...] --out OUT
        [--score-thresh 0.5] [--nms-thresh T] [--detections-per-img N]
        [--canvas HxW [--canvas HxW ...]] [--batch-size N] [--min-size S] [--max-size S]

INPUT is an image file or a directory (its image files, sorted by name, not recursive).
For each image writes OUT/<name>.png (boxes with "name: score" captions) and
OUT/<name>.json: a list of {"box": [x1, y1, x2, y2] (original pixels), "score", "label"
(model class index), "name"} sorted by decreasing score. A Mask R-CNN checkpoint also
draws each detection's mask as a translucent fill in its box's colour (torchvision's
`draw_segmentation_masks`) and adds "segmentation" to each record: the COCO compressed
RLE ({"size": [H, W], "counts": str}, pycocotools) of its mask pasted into the original
image (torchvision's `paste_masks_in_image` arithmetic) and thresholded at 0.5; masks are
pasted and encoded one at a time, never held as a [K, H, W] array. <name> is the file's stem; when
inputs share a stem (a/x.jpg, b/x.png) the later ones get "-2", "-3", ... in input order
(the printed line names each output). DIR is a converted torchvision checkpoint
(`python -m frcnn_jax.convert`) or a training work directory.

The post-process flags replace the checkpoint's `roi_heads.postprocess` values in the
compiled model (a --score-thresh below the trained 0.05 keeps more boxes). --canvas
(repeatable, multiples of 32, as in `frcnn_jax.export`) bounds the compiled shapes: each
image uses the smallest canvas that holds it, and the canvases must hold every image the
resize rule (--min-size / --max-size) can produce; without it a training work
directory's canvases are used, else each image is padded to multiples of 32 (one compile
per padded shape). --batch-size images of one canvas run per call. Images are decoded as
they are needed (at most a few batches are held).

Exit status: 0 all images done; 1 some image failed (each failure is one
`error: <path>: <reason>` line on stderr: unreadable, not an image, no canvas holds it,
or the inference itself failed) while the others still ran; 2 bad arguments or a
checkpoint that cannot be used (one `error:` line).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Iterable, Sequence

import numpy as np

from frcnn_jax.config_cli import add_postprocess_arguments, postprocess_overrides
from frcnn_jax.data.transforms import resized_hw
from frcnn_jax.modeling.cpu_kernels import CPU_KERNELS
from frcnn_jax.visualize import draw_detections, label_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def detection_records(det: dict, class_names, segmentations=None) -> list[dict]:
    """One image's detections -> JSON records by decreasing score.

    det: boxes [K, 4] float32 (x1, y1, x2, y2) original pixels, scores [K], labels [K]
    (a `Detector` result). class_names: index = label, entry 0 = background (the
    checkpoint's `class_names`), or None. segmentations: optional iterable of K COCO RLE
    dicts in det's order (e.g. `host_masks.iter_mask_rles`), added as "segmentation".
    Returns [{"box", "score", "label", "name"[, "segmentation"]}, ...].
    """
    order = np.argsort(-det["scores"], kind="stable")
    segs = None if segmentations is None else list(segmentations)
    if segs is not None and len(segs) != len(order):
        raise ValueError(f"{len(segs)} segmentations for {len(order)} detections")
    out = []
    for k in order:
        label = int(det["labels"][k])
        record = {
            "box": [float(v) for v in det["boxes"][k]],
            "score": float(det["scores"][k]),
            "label": label,
            "name": label_name(label, class_names),
        }
        if segs is not None:
            record["segmentation"] = segs[k]
        out.append(record)
    return out


def mask_rles(image_hw, det: dict):
    """COCO RLEs of a `Detector(mask_output="box")` result's masks, one at a time (None without masks).

    det["masks"]: [K, M, M] float32 probabilities in each box's frame; det["boxes"]: [K, 4]
    original pixels; image_hw: (H, W). Yields {"size": [H, W], "counts": str} per
    detection, `probability > 0.5` pasted at the original size.
    """
    from frcnn_jax import host_masks

    if "masks" not in det:
        return None
    return host_masks.iter_mask_rles(det["masks"], det["boxes"], image_hw)


detections_to_json = detection_records  # the previous name


def draw_result(image: np.ndarray, det: dict, class_names):
    """uint8 [H, W, 3] image and its `Detector` result -> PIL image with the detections drawn.

    Masks, when the result has them, are filled in: float [K, M, M] probabilities in the
    box frame (`Detector(mask_output="box")`) are pasted one at a time (crops,
    `host_masks.iter_pasted_masks`, `> 0.5`); [K, H, W] bool or a list of RLE dicts
    (mask_output "image" / "rle") are drawn as they are.
    """
    masks = det.get("masks")
    if isinstance(masks, np.ndarray) and masks.dtype != bool:  # box frame [K, M, M] probabilities
        from frcnn_jax import host_masks

        masks = host_masks.iter_pasted_masks(masks, det["boxes"], image.shape[:2])
    return draw_detections(image, det["boxes"], det["scores"], det["labels"], class_names, masks=masks)


def expand_inputs(inputs: Sequence[str]) -> list[pathlib.Path]:
    """Files as given; a directory -> its image files (IMAGE_SUFFIXES, any case), sorted by name.

    A path that does not exist stays in the list (it is reported when its turn comes).
    """
    paths = []
    for text in inputs:
        p = pathlib.Path(text)
        if p.is_dir():
            paths.extend(sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES))
        else:
            paths.append(p)
    return paths


def output_names(paths: Sequence[pathlib.Path]) -> list[str]:
    """A unique output name per input: its stem, or stem-2, stem-3, ... for later ones sharing it."""
    used: set[str] = set()
    names = []
    for p in paths:
        name, k = p.stem, 1
        while name in used:
            k += 1
            name = f"{p.stem}-{k}"
        used.add(name)
        names.append(name)
    return names


def read_image(path: pathlib.Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB; ValueError with a short reason ("does not exist", "not an image: ...")."""
    from frcnn_jax.data.images import decode_image

    if not path.exists():
        raise ValueError("does not exist")
    if not path.is_file():
        raise ValueError("not a file")
    try:
        return decode_image(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        cause = e.__context__ or e
        raise ValueError(f"not a readable image ({cause})") from None


def run(detector, items: Iterable[tuple[pathlib.Path, str]], out_dir: pathlib.Path) -> int:
    """Detects, writes and reports each (input path, output name); returns the number of failures.

    Images are decoded one at a time and queued per canvas; a canvas's queue runs as one
    call when it holds `detector.batch_size` images, the fullest queue runs when more
    than 4 batches are held, and the rest at the end.
    """
    failures = 0
    queues: dict[tuple[int, int], list] = {}

    def fail(path, reason):
        nonlocal failures
        failures += 1
        print(f"error: {path}: {reason}", file=sys.stderr, flush=True)

    def flush(canvas):
        batch = queues.pop(canvas)
        try:
            dets = detector([image for _, _, image in batch])
        except Exception as e:  # noqa: BLE001 - one line per image, the others still run
            for path, _, _ in batch:
                fail(path, f"inference failed ({type(e).__name__}: {e})")
            return
        for (path, name, image), det in zip(batch, dets):
            records = detection_records(det, detector.class_names, mask_rles(image.shape[:2], det))
            try:
                (out_dir / f"{name}.json").write_text(json.dumps(records, indent=1))
                draw_result(image, det, detector.class_names).save(out_dir / f"{name}.png")
            except OSError as e:
                fail(path, f"cannot write {out_dir / name}.* ({e.strerror or e})")
                continue
            print(f"{path}: {len(records)} detections -> {out_dir / (name + '.png')}", flush=True)

    for path, name in items:
        try:
            image = read_image(path)
            h, w = image.shape[:2]
            canvas = detector.canvas_for(*resized_hw(h, w, detector.min_size, detector.max_size))
        except ValueError as e:
            fail(path, str(e))
            continue
        queues.setdefault(canvas, []).append((path, name, image))
        if len(queues[canvas]) >= detector.batch_size:
            flush(canvas)
        elif sum(len(q) for q in queues.values()) > 4 * detector.batch_size:
            flush(max(queues, key=lambda c: len(queues[c])))
    for canvas in list(queues):
        flush(canvas)
    return failures


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m frcnn_jax.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("images", nargs="+", metavar="INPUT", help="image files (JPEG, PNG, ...) or directories of them")
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory or training work directory")
    p.add_argument("--out", required=True, help="output directory for <name>.png and <name>.json")
    add_postprocess_arguments(p, {"score_thresh": 0.5})
    p.add_argument(
        "--canvas", action="append", default=None, metavar="HxW", help="canvas size, multiples of 32; repeatable"
    )
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="images per compiled call (default 1)")
    p.add_argument("--min-size", type=int, default=None, help="resize short side (default: checkpoint's or 800)")
    p.add_argument("--max-size", type=int, default=None, help="cap on the long side (default: checkpoint's or 1333)")
    p.add_argument(
        "--cpu-kernels", choices=CPU_KERNELS, default=None,
        help="XLA:CPU's kernels (model.cpu_kernels; default: the checkpoint's): ynnpack_dots runs convolutions on "
        "XLA's own kernels; same detections up to float rounding (README, Benchmarks: it speeds training, "
        "not inference, on the development CPU)",
    )  # fmt: skip
    return p


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        postprocess = postprocess_overrides(args)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        for flag, v in (("--min-size", args.min_size), ("--max-size", args.max_size)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        from frcnn_jax.export.artifact import parse_canvas

        canvases = [parse_canvas(c) for c in args.canvas or []]
        if len(set(canvases)) != len(canvases):
            raise ValueError("--canvas: a canvas is given twice")
    except ValueError as e:
        return _fail(str(e))

    from frcnn_jax import compilation_cache
    from frcnn_jax.detector import Detector

    compilation_cache.enable()
    kwargs = {"batch_size": args.batch_size, "mask_output": "box", **postprocess}  # masks pasted per detection
    if args.cpu_kernels:
        kwargs["cpu_kernels"] = args.cpu_kernels
    for key in ("min_size", "max_size"):
        if getattr(args, key):
            kwargs[key] = getattr(args, key)
    if canvases:
        kwargs["canvases"] = canvases
    try:
        detector = Detector.from_checkpoint(args.checkpoint, **kwargs)
        if canvases:
            detector.check_canvases_cover()
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        return _fail(f"--canvas {' '.join(args.canvas)}: {msg}" if msg.startswith("no canvas holds") else msg)
    except Exception as e:  # noqa: BLE001 - orbax / JSON readers raise many types for a broken directory
        return _fail(f"cannot read checkpoint {args.checkpoint} ({type(e).__name__}: {e})")
    paths = expand_inputs(args.images)
    if not paths:
        return _fail(f"no image files in {' '.join(args.images)}")
    out_dir = pathlib.Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create --out {out_dir} ({e.strerror or e})")
    failures = run(detector, zip(paths, output_names(paths)), out_dir)
    if failures:
        print(f"{failures} of {len(paths)} images failed", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
