"""Data parallelism with `jax.sharding`: batch split over devices, parameters replicated.

    mesh = data_mesh()                                   # all devices, one "data" axis
    step = shard_train_step(train_step, mesh, state)     # jitted, donates the old state
    state, metrics = step(state, put_batch(batch, mesh))

Losses are means over the *global* batch inside one jitted program, so XLA inserts the
gradient all-reduce itself and the sharded step computes the same update as a single
device would on the whole batch. Multi-host: call `initialize_distributed()` first (it
wraps `jax.distributed.initialize`); every process then feeds its own shard of the
global batch (`process_batch_to_global`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
):
    """Multi-host setup: `jax.distributed.initialize` (arguments or JAX's environment auto-detection).

    Must run before any other JAX call. On a single host without arguments it does nothing.
    """
    if coordinator_address is None and num_processes is None and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def data_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch: int, mesh: Mesh):
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"data.batch_size={global_batch} must be divisible by the number of devices ({n})")


def put_batch(batch: dict, mesh: Mesh) -> dict:
    """Single host: numpy global batch -> arrays sharded along the batch axis."""
    check_batch_size(len(next(iter(batch.values()))), mesh)
    return jax.device_put(batch, batch_sharding(mesh))


def process_batch_to_global(local_batch: dict, mesh: Mesh) -> dict:
    """Multi-host: this process's part of the batch -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def shard_carry_step(step, mesh: Mesh, *carry_examples, compiler_options: dict | None = None):
    """jit `step(*carries, batch) -> carries` with replicated, donated carries and a sharded batch.

    The training loop's step: the carries are the train state and the device-side
    metric monitor (`frcnn_jax.training.monitor`); nothing is returned to the host.
    `compiler_options`: XLA options for the compile (`host_memory.step_compiler_options`).
    """
    rep = replicated(mesh)
    shardings = tuple(jax.tree.map(lambda _: rep, c) for c in carry_examples)
    n = len(carry_examples)
    return jax.jit(
        step,
        in_shardings=shardings + (batch_sharding(mesh),),
        out_shardings=shardings if n > 1 else shardings[0],
        donate_argnums=tuple(range(n)),
        compiler_options=compiler_options,
    )


def shard_train_step(train_step, mesh: Mesh, state_example, compiler_options: dict | None = None):
    """jit `train_step(state, batch) -> (state, metrics)` with replicated state and sharded batch."""
    rep = replicated(mesh)
    state_sharding = jax.tree.map(lambda _: rep, state_example)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, rep),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )
