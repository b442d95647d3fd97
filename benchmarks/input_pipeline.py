"""Input-pipeline throughput and evaluation time per image.

    python benchmarks/input_pipeline.py [--batches 20] [--shared ../shared]
    python benchmarks/input_pipeline.py --smoke    # 2 batches, in-process loading, 8 eval images (the suite runs it)

Rows:
  - train pipeline images/s on coco128 (real JPEGs, resize to 800/1333, flip, normalise,
    pad, canvas grouping) with 0 and 2 grain workers, batch 2 (the COCO configs' per-step
    load on a CPU);
  - the same on the built-in shapes dataset at 128x128, batch 8 (the default config);
  - the default config's training step, to show the pipeline is not the bottleneck;
  - evaluation time per image (pipeline + jitted inference + COCO evaluation) for the
    default shapes model, compile excluded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from _timing import machine_line, print_table  # noqa: E402


def pipeline_rate(source, batches: int, **kw) -> float:
    from frcnn_jax.data import build_iterator

    it = build_iterator(source, **kw)
    next(it)  # worker start-up and the first batch are not counted
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["image"])
    rate = n / (time.perf_counter() - t0)
    it.close()
    return rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared"))
    p.add_argument("--eval-images", type=int, default=96)
    p.add_argument("--smoke", action="store_true", help="2 batches, 0 workers, 2 steps, 8 eval images")
    args = p.parse_args(argv)
    workers_list, steps = ((0,), 2) if args.smoke else ((0, 2), 20)
    if args.smoke:
        args.batches, args.eval_images = 2, 8
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (defaults here)
    import jax

    from configs import default as default_config
    from frcnn_jax.data import CocoJsonSource, ShapesDataset, builder
    from frcnn_jax.evaluation.model_eval import evaluate_model, make_forward
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
    from frcnn_jax.training.loop import optim_config
    from frcnn_jax.training.optim import learning_rate_schedule
    from frcnn_jax.training.train_step import create_train_state, make_train_step

    rows = []
    coco = os.path.join(args.shared, "data", "coco128")
    if os.path.isdir(coco):
        src = CocoJsonSource(os.path.join(coco, "annotations.json"), os.path.join(coco, "images"))
        for workers in workers_list:
            rate = pipeline_rate(
                src, args.batches, batch_size=2, canvases=[(800, 1344), (1344, 800)], min_size=800, max_size=1333,
                max_gt=100, train=True, seed=0, num_workers=workers,
            )  # fmt: skip
            rows.append(
                [
                    "train pipeline, coco128 800/1333, batch 2",
                    workers,
                    f"{rate:.1f} img/s",
                    f"{2 / rate * 1e3:.0f} ms/batch",
                ]
            )
    else:
        print(f"(coco128 not found at {coco}; skipping its rows)", file=sys.stderr)

    config = default_config.get_config()
    shapes = ShapesDataset("train", num_images=10_000)
    for workers in workers_list:
        rate = pipeline_rate(
            shapes, args.batches * 4, batch_size=8, canvases=[(128, 128)], min_size=128, max_size=128, max_gt=8,
            train=True, seed=0, num_workers=workers,
        )  # fmt: skip
        rows.append(
            ["train pipeline, shapes 128x128, batch 8", workers, f"{rate:.0f} img/s", f"{8 / rate * 1e3:.1f} ms/batch"]
        )

    # The default config's train step on one batch (compile excluded).
    cfg = ModelConfig.from_dict(config.model.to_dict())
    model = FasterRCNN(cfg)
    variables = init_variables(model, jax.random.key(0))
    ocfg = optim_config(config)
    state, tx = create_train_state(model, variables, ocfg, 0)
    step = jax.jit(make_train_step(model, tx, learning_rate_schedule(ocfg)), donate_argnums=0)
    it = builder.train_iterator(shapes, config.data, seed=0)
    batch = next(it)
    state, m = step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    it.close()
    rows.append(
        ["default config train step (model only), batch 8", "-", f"{8 / dt:.0f} img/s", f"{dt * 1e3:.0f} ms/step"]
    )

    # Evaluation per image: pipeline + inference + pycocotools, second pass (compiled).
    config.data.shapes.num_val = args.eval_images
    val = builder.build_source(config.data, "val")
    forward = make_forward(model)  # one jitted program for both passes: the second is compiled
    evaluate_model(model, state, val, config, progress=False, forward=forward)
    t0 = time.perf_counter()
    evaluate_model(model, state, val, config, progress=False, forward=forward)
    per_image = (time.perf_counter() - t0) / len(val)
    rows.append(
        [
            f"evaluation (default model, shapes val, {len(val)} images)",
            0,
            f"{1 / per_image:.0f} img/s",
            f"{per_image * 1e3:.1f} ms/img",
        ]
    )

    print_table(f"Input pipeline and evaluation; {machine_line()}", ["what", "workers", "throughput", "time"], rows)


if __name__ == "__main__":
    main()
