"""Training-loop throughput: the real loop against the bare jitted step, same machine, same run.

    python benchmarks/train_loop.py [--configs default,coco128_fpn] [--steps 60] [--log-every 10]
    python benchmarks/train_loop.py --smoke    # the default config, 6 loop steps (the test suite runs it)

"loop": `train_and_evaluate` as `train.py` runs it (grain input pipeline, device
prefetch, device-side metrics fetched every `--log-every` steps, one asynchronous
checkpoint at the end), images/s from its own metrics.jsonl windows, the first window
(compile) excluded. "bare step": the same jitted, sharded train step called back to back on
one device-resident batch (no input pipeline, no logging), compile excluded. The ratio
says how much of the device's speed the loop delivers (goal >= 0.95 for the default
config).

Configs: "default" (configs/default.py, R-18-FPN on 128 px shapes, batch 8) and
"coco128_fpn" (configs/coco128_fpn.py, R-50-FPN on the coco128 photos of ../shared,
batch 2; two canvases, so the loop compiles two shapes: only windows after both
compiled count, and the bare step uses the landscape canvas).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from _timing import machine_line, print_table  # noqa: E402


def _config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def loop_images_per_sec(config, steps: int, log_every: int, skip_windows: int) -> tuple[float, int]:
    """(images/s over the loop's windows after the first `skip_windows`, steps timed)."""
    import json
    import pathlib

    from frcnn_jax.training.loop import train_and_evaluate

    config.train.update(
        num_steps=10 * steps, log_every=log_every, checkpoint_every=10 * steps, eval_every=0, visualize=0
    )
    with tempfile.TemporaryDirectory() as workdir:
        train_and_evaluate(config, workdir, stop_after_steps=steps)
        rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "images_per_sec" in r][skip_windows:]
    images = sum(log_every * config.data.batch_size for _ in rows)
    seconds = sum(log_every * config.data.batch_size / r["images_per_sec"] for r in rows)
    return images / seconds, log_every * len(rows)


def bare_images_per_sec(config, steps: int) -> float:
    """images/s of the jitted sharded step on one device-resident batch (compile excluded)."""
    import jax

    from frcnn_jax.data import builder
    from frcnn_jax.modeling.config import ModelConfig
    from frcnn_jax.modeling.faster_rcnn import FasterRCNN, init_variables
    from frcnn_jax.training import host_memory, sharding
    from frcnn_jax.training.loop import optim_config
    from frcnn_jax.training.optim import learning_rate_schedule
    from frcnn_jax.training.train_step import create_train_state, make_train_step

    model = FasterRCNN(ModelConfig.from_dict(config.model.to_dict()))
    optim_cfg = optim_config(config)
    state, tx = create_train_state(model, init_variables(model, jax.random.key(0)), optim_cfg, 0)
    mesh = sharding.data_mesh()
    state = jax.device_put(state, sharding.replicated(mesh))
    # as the loop compiles it
    options = host_memory.step_compiler_options(str(config.train.xla_cpu_scheduler), model.cfg.cpu_kernels)
    step = sharding.shard_train_step(
        make_train_step(model, tx, learning_rate_schedule(optim_cfg)), mesh, state, compiler_options=options
    )
    it = builder.train_iterator(builder.build_source(config.data, "train"), config.data, seed=0)
    batch = next(it)
    while tuple(batch["image"].shape[1:3]) != tuple(config.data.canvases[0]):
        batch = next(it)
    it.close()
    batch = sharding.put_batch(batch, mesh)
    state, metrics = step(state, batch)  # compile
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return steps * config.data.batch_size / (time.perf_counter() - t)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="default,coco128_fpn")
    parser.add_argument("--steps", type=int, default=0, help="loop steps (default: 120 default, 24 coco128_fpn)")
    parser.add_argument("--log-every", type=int, default=0, help="log window (default: 20 default, 4 coco128_fpn)")
    parser.add_argument("--smoke", action="store_true", help="the default config only, 6 steps in windows of 2")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs, args.steps, args.log_every = "default", 6, 2
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes (data.num_workers "auto" on accelerators) read absl flags
    defaults = {"default": (120, 20, 1), "coco128_fpn": (24, 4, 2)}
    rows = []
    for name in args.configs.split(","):
        steps, log_every, skip = defaults.get(name, (60, 10, 1))
        steps, log_every = args.steps or steps, args.log_every or log_every
        loop, timed = loop_images_per_sec(_config(name), steps, log_every, skip)
        bare = bare_images_per_sec(_config(name), max(timed // 2, 3))
        config = _config(name)
        rows.append(
            [
                name,
                config.model.arch,
                config.model.backbone.depth,
                config.data.batch_size,
                timed,
                f"{loop:.2f}",
                f"{bare:.2f}",
                f"{loop / bare:.3f}",
            ]
        )
        print(f"{name}: loop {loop:.2f} img/s, bare step {bare:.2f} img/s", flush=True)
    print_table(
        f"training loop vs bare step (images/s, compile excluded); {machine_line()}",
        ["config", "arch", "depth", "batch", "loop steps timed", "loop img/s", "bare step img/s", "loop / bare"],
        rows,
    )


if __name__ == "__main__":
    main()
