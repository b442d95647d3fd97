"""Run a detector on image files and draw what it sees.

    python -m frcnn_jax.predict --checkpoint DIR image.jpg [more.jpg ...] --out out/ [--score-threshold 0.5]

For each image writes out/<stem>.png (boxes with "name: score" captions) and
out/<stem>.json: a list of {"box": [x1, y1, x2, y2] (original pixels), "score",
"label" (model class index), "name"} sorted by decreasing score. DIR is a converted
torchvision checkpoint (`python -m frcnn_jax.convert`) or a training work directory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from frcnn_jax.visualize import draw_detections, label_name


def detections_to_json(det: dict, class_names) -> list[dict]:
    """Detections (boxes [K, 4], scores [K], labels [K]) -> JSON rows by decreasing score.

    class_names: index = label, entry 0 = background (the checkpoint's `class_names`), or None.
    """
    order = np.argsort(-det["scores"], kind="stable")
    out = []
    for k in order:
        label = int(det["labels"][k])
        name = label_name(label, class_names)
        out.append(
            {
                "box": [float(v) for v in det["boxes"][k]],
                "score": float(det["scores"][k]),
                "label": label,
                "name": name,
            }
        )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m frcnn_jax.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--checkpoint", required=True, help="model checkpoint directory or training work directory")
    parser.add_argument("--out", required=True, help="output directory for <stem>.png and <stem>.json")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")
    parser.add_argument("--min-size", type=int, default=None, help="resize short side (default: checkpoint's or 800)")
    parser.add_argument(
        "--max-size", type=int, default=None, help="cap on the long side (default: checkpoint's or 1333)"
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be in [0, 1], got {args.score_threshold}")

    from frcnn_jax import compilation_cache
    from frcnn_jax.data.images import decode_image
    from frcnn_jax.detector import Detector

    compilation_cache.enable()

    kwargs = {"score_threshold": args.score_threshold}
    if args.min_size:
        kwargs["min_size"] = args.min_size
    if args.max_size:
        kwargs["max_size"] = args.max_size
    try:
        detector = Detector.from_checkpoint(args.checkpoint, **kwargs)
        paths = [pathlib.Path(p) for p in args.images]
        images = [decode_image(p) for p in paths]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, images):
        det = detector(image)
        items = detections_to_json(det, detector.class_names)
        (out_dir / f"{path.stem}.json").write_text(json.dumps(items, indent=1))
        draw_detections(image, det["boxes"], det["scores"], det["labels"], detector.class_names).save(
            out_dir / f"{path.stem}.png"
        )
        print(f"{path}: {len(items)} detections -> {out_dir / (path.stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
