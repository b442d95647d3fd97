"""Write a serving artifact (StableHLO, weights baked in) and its JSON sidecar from a checkpoint.

    python -m frcnn_jax.export --checkpoint CKPT --out FILE --canvas HxW [--canvas HxW ...] --batch N
        [--platforms cpu,cuda,tpu] [--dtype float32|bfloat16] [--dynamic-batch]
        [--min-size S] [--max-size S] [--score-thresh T] [--nms-thresh T] [--detections-per-img N]

CKPT is a converted model (`python -m frcnn_jax.convert`) or a training work directory.
One canvas: FILE is the artifact; several: one artifact per canvas, `<stem>-HxW<suffix>`
beside FILE. FILE.json (the sidecar) lists them with the preprocessing contract.
`--dynamic-batch` makes the batch dimension symbolic (any B per call; N is then the
loader's default number of images per call). Without --canvas, the checkpoint's own
canvases (a training run's `data.canvases`) are used. --score-thresh, --nms-thresh and
--detections-per-img replace the checkpoint's `roi_heads.postprocess` values in the
exported program (the sidecar records the values baked in). A Mask R-CNN checkpoint's
artifact adds the output "masks" [B, D, M, M] float32 (box-frame probabilities; the
sidecar's "mask_postprocessing" says how to paste them, as `export.load` does).

Exit codes: 0 written; 2 bad arguments (canvas, platform, dtype, batch, sizes, --out a
directory); 1 the checkpoint cannot be used (missing, unreadable, backbone only) or the
output cannot be written. Errors are one `error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from frcnn_jax.config_cli import add_postprocess_arguments, postprocess_overrides
from frcnn_jax.export.artifact import DTYPES, PLATFORMS, parse_canvas, parse_platforms


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m frcnn_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory or training work directory")
    p.add_argument("--out", required=True, help="artifact file to write (its sidecar is FILE.json)")
    p.add_argument(
        "--canvas", action="append", default=None, metavar="HxW", help="canvas size, multiples of 32; repeatable"
    )
    p.add_argument("--batch", type=int, required=True, metavar="N", help="images per call")
    p.add_argument(
        "--platforms",
        default="cpu,cuda,tpu",
        help=f"comma-separated, from {','.join(PLATFORMS)} (default: cpu,cuda,tpu)",
    )
    p.add_argument("--dtype", default=None, help="compute dtype float32 or bfloat16 (default: the checkpoint's)")
    p.add_argument("--dynamic-batch", action="store_true", help="symbolic batch dimension (any B per call)")
    p.add_argument("--min-size", type=int, default=None, help="resize short side (default: checkpoint's or 800)")
    p.add_argument("--max-size", type=int, default=None, help="cap on the long side (default: checkpoint's or 1333)")
    add_postprocess_arguments(p)
    return p


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        canvases = [parse_canvas(c) for c in args.canvas or []]
        platforms = parse_platforms(args.platforms)
        if len(set(canvases)) != len(canvases):
            raise ValueError("--canvas: a canvas is given twice")
        if args.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {args.batch}")
        if args.dtype is not None and args.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
        for flag, v in (("--min-size", args.min_size), ("--max-size", args.max_size)):
            if v is not None and v < 1:
                raise ValueError(f"{flag} must be >= 1, got {v}")
        postprocess = postprocess_overrides(args)
        if pathlib.Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; give the artifact's file name")
    except ValueError as e:
        return _fail(str(e), 2)

    from frcnn_jax import model_checkpoint
    from frcnn_jax.detector import with_postprocess
    from frcnn_jax.export import artifact

    try:
        cfg, variables, meta = model_checkpoint.load_model(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        return _fail(str(e), 1)
    except Exception as e:  # orbax / JSON readers raise many types for a broken directory
        return _fail(f"cannot read checkpoint {args.checkpoint} ({type(e).__name__}: {e})", 1)
    if cfg is None:
        return _fail(f"{args.checkpoint} holds a backbone only ({meta.get('kind')}), not a detector", 1)
    if not canvases:
        if not meta.get("canvases"):
            return _fail("--canvas is required (the checkpoint names no canvases)", 2)
        canvases = [tuple(int(v) for v in c) for c in meta["canvases"]]
    cfg = with_postprocess(cfg, **postprocess)
    dtype = args.dtype or cfg.dtype
    min_size = args.min_size or int(meta.get("min_size", 800))
    max_size = args.max_size or int(meta.get("max_size", 1333))

    exported = {
        c: artifact.export_forward(
            cfg, variables, c, args.batch, platforms=platforms, dynamic_batch=args.dynamic_batch, dtype=dtype
        )
        for c in canvases
    }
    doc = artifact.sidecar_document(
        cfg, meta, canvases=canvases, batch=args.batch, dynamic_batch=args.dynamic_batch, platforms=platforms,
        dtype=dtype, min_size=min_size, max_size=max_size,
    )  # fmt: skip
    try:
        side = artifact.write_artifacts(args.out, exported, doc)
    except OSError as e:
        return _fail(f"cannot write {args.out} ({e.strerror or e})", 1)
    batch = "b (dynamic)" if args.dynamic_batch else args.batch
    for path, c in zip(artifact.artifact_paths(args.out, canvases), canvases):
        size = path.stat().st_size / 2**20
        print(f"{path}: canvas {c[0]}x{c[1]}, batch {batch}, {dtype}, {','.join(platforms)}, {size:.1f} MiB")
    print(f"{side}: sidecar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
