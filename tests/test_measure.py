"""Timing against planted durations and an independent clock; profile_step."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.measure import Timing, profile_step, time_blocking, time_pipelined

SLEEP_S = 0.02


def _sleeper():
    """A step whose device-side duration is known: a host callback that sleeps."""

    def host(x):
        time.sleep(SLEEP_S)
        return x + 1

    return jax.jit(lambda x: jax.pure_callback(host, jax.ShapeDtypeStruct(x.shape, x.dtype), x))


def test_pipelined_timing_recovers_a_planted_step_time():
    step = _sleeper()
    state = {"x": jnp.zeros((4,), jnp.float32)}

    def dispatch(i):
        state["x"] = step(state["x"])
        return state["x"]

    timing = time_pipelined(dispatch, n_steps=10, warmup=2)
    assert len(timing.samples_s) == 10
    assert SLEEP_S * 0.95 < timing.median_s < SLEEP_S * 1.3
    assert float(state["x"][0]) == 2 + 12  # warm-up, reference, timed and tail steps all ran, in order


def test_pipelined_agrees_with_an_independent_wall_clock():
    a = jax.random.normal(jax.random.key(0), (768, 768))
    step = jax.jit(lambda x: jnp.tanh(x @ a) @ a * 1e-3)
    state = {"x": a}

    def dispatch(i):
        state["x"] = step(state["x"])
        return state["x"]

    timing = time_pipelined(dispatch, n_steps=10, warmup=2)
    n = 10
    start = time.perf_counter()
    for _ in range(n):
        state["x"] = step(state["x"])
    jax.block_until_ready(state["x"])
    independent = (time.perf_counter() - start) / n
    assert timing.mean_s == pytest.approx(independent, rel=0.25)


def test_pipelining_hides_host_overhead_that_per_step_blocking_counts():
    """Planted: 8 ms of host work before each dispatch of a ~20 ms computation.
    Per-step blocking serializes the two; pipelining overlaps the host work with
    the previous step, so its samples match the device time measured on its own
    (many steps dispatched back to back, one block at the end)."""
    a = jax.random.normal(jax.random.key(0), (1024, 1024))
    step = jax.jit(lambda x: jnp.tanh(x @ a) @ a * 1e-3)
    state = {"x": a}
    host_s = 0.008

    def dispatch(i):
        time.sleep(host_s)
        state["x"] = step(state["x"])
        return state["x"]

    jax.block_until_ready(step(a))
    start = time.perf_counter()
    x = a
    for _ in range(10):
        x = step(x)
    jax.block_until_ready(x)
    device_s = (time.perf_counter() - start) / 10
    blocking = time_blocking(dispatch, 8, 1)
    pipelined = time_pipelined(dispatch, 8, 1)
    assert blocking.median_s > device_s + 0.6 * host_s
    assert pipelined.median_s < blocking.median_s - 0.5 * host_s
    assert pipelined.median_s == pytest.approx(device_s, rel=0.3)


def test_statistics_on_known_samples():
    t = Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert t.median_s == 3.0
    assert t.p10_s == pytest.approx(1.4)
    assert t.p90_s == pytest.approx(61.6)
    assert t.cv == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1) / 22.0)


def test_profile_step_on_a_user_function_across_shardings():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
    a = jax.device_put(jnp.ones((512, 256), jnp.float32), NamedSharding(mesh, P("x", None)))
    b = jax.device_put(jnp.ones((256, 256), jnp.float32), NamedSharding(mesh, P()))
    flops = 2 * 512 * 256 * 256
    prof = profile_step(lambda x, y: x @ y, a, b, n_steps=5, warmup=1, model_flops=flops, peak_tflops=1.0)
    assert prof.n_devices == 4
    assert prof.xla_flops_per_step == pytest.approx(flops, rel=0.01)  # summed over the 4 devices
    assert prof.mfu == pytest.approx(flops / (prof.step_time_s * 4 * 1e12))
    assert prof.all_reduce_bytes == 0  # rows are split, nothing to reduce
    row = prof.to_row()
    assert row["step_time_s"] == prof.step_time_s and len(row["step_time_samples_s"].split(";")) == 5
    # contracting over the sharded axis needs an all-reduce of the full (256, 256) float32 result
    at = jax.device_put(jnp.ones((256, 512), jnp.float32), NamedSharding(mesh, P(None, "x")))
    reduced = profile_step(lambda x, y: x @ y, at, a, n_steps=3, warmup=1)
    assert reduced.all_reduce_bytes == 256 * 256 * 4 and reduced.all_reduce_count == 1
