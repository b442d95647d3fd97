"""Device prefetch: the next batches are prepared and placed on the devices while a step runs.

    it = DevicePrefetcher(host_iterator, place=lambda b: sharding.put_batch(b, mesh), depth=2)
    batch = next(it)          # jax.Arrays, already sharded as the train step expects
    it.get_state()            # the host iterator's state after the last batch *returned*

A background thread pulls numpy batches from the host iterator (the grain pipeline),
starts their `device_put` (`place`) and keeps up to `depth` placed batches in a bounded
queue. The training loop therefore never waits for the host unless the input pipeline
is slower than the device, and batch k+1's host-to-device copy overlaps step k.

Exact resume: with each batch the thread records the host iterator's state right after
producing it. `get_state()` returns the state recorded with the last batch handed out,
never that of batches still waiting in the queue, so a checkpoint of step k resumes
with batch k+1 whatever the prefetch depth. `set_state()` stops the thread, drops the
queued batches and restores the host iterator; prefetching restarts on the next
`next()` (or `start_prefetch()`).

The class is a `grain.DatasetIterator`, so grain's orbax handlers
(`grain.checkpoint.CheckpointSave` / `CheckpointRestore`) save and restore it inside the
run's checkpoint.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import grain

_DONE = object()


class DevicePrefetcher(grain.DatasetIterator):
    """Wraps a host iterator with `get_state`/`set_state`; yields `place(batch)` (see module doc).

    Args:
      host_iterator: a grain `DatasetIterator` of numpy batches.
      place: numpy batch -> device arrays (e.g. `sharding.put_batch`); runs in the
        background thread.
      depth: placed batches kept ready (>= 1).
    """

    def __init__(self, host_iterator: grain.DatasetIterator, place: Callable[[Any], Any], depth: int = 2):
        super().__init__()
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._host = host_iterator
        self._place = place
        self._depth = depth
        self._state = host_iterator.get_state()
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    # -- the background producer ------------------------------------------------------------

    def _produce(self, out: queue.Queue, stop: threading.Event):
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            while not stop.is_set():
                try:
                    batch = next(self._host)
                except StopIteration:
                    put(_DONE)
                    return
                state = self._host.get_state()
                if not put((self._place(batch), state)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)

    def start_prefetch(self) -> None:
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self._depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._produce, args=(self._queue, self._stop), name="frcnn-device-prefetch", daemon=True
            )
            self._thread.start()

    def _stop_thread(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = self._queue = self._stop = None

    # -- the iterator --------------------------------------------------------------------------

    def __next__(self):
        self.start_prefetch()
        item = self._queue.get()
        if item is _DONE:
            self._stop_thread()
            raise StopIteration
        if isinstance(item, BaseException):
            self._stop_thread()
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict):
        self._stop_thread()
        self._host.set_state(state)
        self._state = self._host.get_state()

    def close(self) -> None:
        self._stop_thread()
        self._host.close()

    def __str__(self) -> str:
        return f"DevicePrefetcher(depth={self._depth})"
