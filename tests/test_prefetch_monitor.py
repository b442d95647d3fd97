"""The training loop's parts: device prefetch (state of consumed batches) and the device-side monitor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.data.pipeline import build_iterator
from frcnn_jax.data.shapes import ShapesDataset
from frcnn_jax.modeling.config import ModelConfig
from frcnn_jax.training import monitor as monitor_lib
from frcnn_jax.training import sharding
from frcnn_jax.training.prefetch import DevicePrefetcher
from frcnn_jax.training.train_step import metric_names


def _host_iterator(seed=0):
    source = ShapesDataset("train", num_images=64, image_size=(64, 64))
    return build_iterator(
        source, batch_size=8, canvases=[(64, 64)], min_size=64, max_size=64, max_gt=8, train=True, seed=seed
    )


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_state_is_that_of_the_consumed_batches(depth):
    mesh = sharding.data_mesh()
    reference = _host_iterator()
    expected_batches, expected_states = [], []
    for _ in range(5):
        expected_batches.append(next(reference))
        expected_states.append(reference.get_state())

    it = DevicePrefetcher(_host_iterator(), lambda b: sharding.put_batch(b, mesh), depth=depth)
    initial = it.get_state()
    for k in range(3):
        batch = next(it)
        assert batch["image"].sharding == sharding.batch_sharding(mesh)  # placed as the step expects
        np.testing.assert_array_equal(np.asarray(batch["image"]), expected_batches[k]["image"])
        assert it.get_state() == expected_states[k]  # not the state of the batches queued behind it
    saved = it.get_state()
    it.close()

    resumed = DevicePrefetcher(_host_iterator(), lambda b: sharding.put_batch(b, mesh), depth=depth)
    assert resumed.get_state() == initial
    resumed.set_state(saved)
    for k in (3, 4):
        np.testing.assert_array_equal(np.asarray(next(resumed)["image"]), expected_batches[k]["image"])
    resumed.close()


def test_prefetcher_raises_the_producer_error_in_the_consumer():
    class Broken:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            if self.n == 2:
                raise FileNotFoundError("image 7.jpg is missing")
            return {"x": np.zeros(2)}

        def get_state(self):
            return {"n": self.n}

        def close(self):
            pass

    it = DevicePrefetcher(Broken(), lambda b: b, depth=2)
    assert next(it)["x"].shape == (2,)
    with pytest.raises(FileNotFoundError, match="7.jpg"):
        next(it)
    it.close()


def _metrics(loss, **over):
    m = {name: jnp.float32(1.0) for name in metric_names(ModelConfig())}
    m["loss"] = jnp.float32(loss)
    m.update({k: jnp.float32(v) for k, v in over.items()})
    return m


def test_monitor_window_means_and_first_non_finite_step():
    acc = jax.jit(monitor_lib.accumulate)
    mon = monitor_lib.init_monitor(metric_names(ModelConfig()))
    mon = acc(mon, _metrics(1.0), jnp.int32(1))
    mon = acc(mon, _metrics(3.0), jnp.int32(2))
    host = jax.device_get(mon)
    assert monitor_lib.window_means(host)["loss"] == pytest.approx(2.0)
    assert monitor_lib.divergence_message(host) is None

    mon = monitor_lib.reset_window(mon)
    assert monitor_lib.window_means(jax.device_get(mon)) == {}
    mon = acc(mon, _metrics(5.0), jnp.int32(3))
    mon = acc(mon, _metrics(float("nan"), loss_box_reg=float("inf")), jnp.int32(4))
    mon = acc(mon, _metrics(float("nan"), grad_norm=float("nan")), jnp.int32(5))  # later: not the first
    host = jax.device_get(mon)
    assert int(host["count"]) == 3
    message = monitor_lib.divergence_message(host)
    assert message == "non-finite loss at step 4: loss=nan, loss_box_reg=inf"
    assert monitor_lib.divergence_message(jax.device_get(monitor_lib.reset_window(mon))) == message  # kept


def test_monitor_checks_the_gradient_norm_too():
    mon = monitor_lib.accumulate(
        monitor_lib.init_monitor(metric_names(ModelConfig())), _metrics(1.0, grad_norm=float("inf")), jnp.int32(7)
    )
    assert monitor_lib.divergence_message(jax.device_get(mon)) == "non-finite loss at step 7: grad_norm=inf"


def test_num_workers_auto_rule():
    from frcnn_jax.data.builder import resolve_num_workers

    assert resolve_num_workers("auto", backend="cpu", cpu_count=64) == 0
    assert resolve_num_workers("auto", backend="gpu", cpu_count=2) == 1
    assert resolve_num_workers("auto", backend="gpu", cpu_count=16) == 8
    assert resolve_num_workers("auto", backend="tpu", cpu_count=240) == 16
    assert resolve_num_workers(3, backend="gpu", cpu_count=16) == 3
    assert resolve_num_workers("4", backend="cpu", cpu_count=16) == 4
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ValueError, match='"auto" or an integer'):
            resolve_num_workers(bad, backend="cpu", cpu_count=2)
