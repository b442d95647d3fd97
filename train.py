"""Train Faster R-CNN.

    python train.py --workdir=DIR [--config=configs/default.py] [--config.field=value ...]
    python train.py --config=configs/x.py [--config.field=value ...] --print_config   # show, exit

Every field of the config (configs/common.py documents them) can be overridden as
--config.<dotted.path>=value; --print_config prints the resolved config and exits.

With no --config, trains the default small R-18-FPN on the built-in shapes dataset
(no downloads). Rerunning the same command resumes from the latest checkpoint in DIR
and continues exactly as an uninterrupted run would, whenever the previous run was
stopped (even by kill -9 during a save). SIGTERM or Ctrl-C stops a single-process run
cleanly: the running step is finished and checkpointed, and the exit status is 128 +
the signal number. Multi-host: pass --coordinator_address, --num_processes and
--process_id (or set JAX's environment) and run the same command on every host.

Writes into DIR: checkpoints/, config.json, metrics.jsonl, tensorboard/,
loss_curve.png, eval_final.json (COCO box AP, AR), eval_detections.json (the final
evaluation's detections, COCO results format) and detections.png.
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if __name__ == "__main__":  # a typo'd --config.<field> is one line (exit 2), before ml_collections parses it
    from frcnn_jax import config_cli

    config_cli.exit_on_unknown_override(sys.argv, default_config=os.path.join(_HERE, "configs", "default.py"))

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and outputs (created; resumed if it holds a run)."
)
config_flags.DEFINE_config_file(
    "config",
    os.path.join(_HERE, "configs", "default.py"),
    "Training configuration file (configs/*.py).",
    lock_config=True,
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: address of process 0 (host:port) for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (the --config file with its --config.* overrides) and exit."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.print_config:
        print(FLAGS.config, end="")
        return 0
    if not FLAGS.workdir:
        print("error: missing --workdir=DIR (where checkpoints and outputs go; see --help)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames at INFO
    from frcnn_jax import compilation_cache
    from frcnn_jax.training import sharding

    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    compilation_cache.enable()  # (after the above: multi-process CPU runs compile afresh)
    from frcnn_jax.training.loop import TrainingDiverged, TrainingInterrupted, train_and_evaluate

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return 128 + e.signum
    except (ValueError, FileNotFoundError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
