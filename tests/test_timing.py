"""Timing a step: pipelined samples are real step times, statistics come from the raw samples."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxscale.timing import Timing, time_blocking, time_pipelined

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
    # a sample spans a whole step: not less than its planted sleep (a dispatch alone takes microseconds);
    # how much more depends on the machine's load, so no upper bound (the simulated clock below checks exactly)
    assert timing.median_s >= SLEEP_S * 0.95
    assert float(state["x"][0]) == 2 + 12  # warm-up, reference, timed and tail steps all ran, in order


def test_pipelined_samples_are_real_step_times_not_dispatch_times():
    """Real asynchronous dispatch: the samples are carved out of the call's own wall time, and they measure
    completed steps, not the microseconds a dispatch takes. The bounds hold on a loaded machine (a tight
    agreement figure is printed by benchmarks/tool_speed.py instead, where noise does not fail a build)."""
    a = jax.random.normal(jax.random.key(0), (768, 768))
    step = jax.jit(lambda x: jnp.tanh(x @ a) @ a * 1e-3)
    state = {"x": a}

    def dispatch(i):
        state["x"] = step(state["x"])
        return state["x"]

    jax.block_until_ready(dispatch(0))
    start = time.perf_counter()
    dispatch_s = []
    for _ in range(5):  # how long a dispatch alone takes: the step is still running when it returns
        t0 = time.perf_counter()
        dispatch(0)
        dispatch_s.append(time.perf_counter() - t0)
    jax.block_until_ready(state["x"])
    independent = (time.perf_counter() - start) / 5
    begin = time.perf_counter()
    timing = time_pipelined(dispatch, n_steps=10, warmup=2)
    elapsed = time.perf_counter() - begin
    assert sum(timing.samples_s) <= elapsed and min(timing.samples_s) > 0
    assert timing.median_s > 4 * float(np.median(dispatch_s))
    assert independent / 4 < timing.median_s < independent * 4


class _SimulatedDevice:
    """A device and a host on a simulated clock: each dispatch costs the host ``host_s``, then queues a step
    that the device runs for ``device_s`` once it is free; waiting on a step moves the clock to its end.
    The event log records the order of dispatches and waits."""

    def __init__(self, host_s: float, device_s: float):
        self.now, self.free, self.host_s, self.device_s = 0.0, 0.0, host_s, device_s
        self.log = []

    def perf_counter(self) -> float:
        return self.now

    def dispatch(self, i: int):
        self.now += self.host_s
        self.free = max(self.now, self.free) + self.device_s
        self.log.append(("dispatch", i))
        device, done = self, self.free

        class Token:
            def block_until_ready(self):
                device.now = max(device.now, done)
                device.log.append(("wait", i))
                return self

        return Token()


@pytest.mark.parametrize("host_s, device_s", [(0.008, 0.020), (0.030, 0.010)])
def test_pipelining_hides_host_overhead_that_per_step_blocking_counts(monkeypatch, host_s, device_s):
    """Planted on a simulated clock (no real timing, so no noise): per-step blocking serializes host work and
    device work (host + device per step); pipelining overlaps them, so a step takes the larger of the two."""
    import jaxscale.timing as timing

    sim = _SimulatedDevice(host_s, device_s)
    monkeypatch.setattr(timing, "time", sim)
    blocking = time_blocking(sim.dispatch, 8, 1)
    assert blocking.samples_s == pytest.approx([host_s + device_s] * 8)
    sim = _SimulatedDevice(host_s, device_s)
    monkeypatch.setattr(timing, "time", sim)
    pipelined = time_pipelined(sim.dispatch, 8, 1)
    assert pipelined.samples_s == pytest.approx([max(host_s, device_s)] * 8)
    # The structure that makes it so: each timed step's wait comes after its successor was dispatched.
    waits = [i for event, i in sim.log if event == "wait"]
    for i in waits[1:-1]:  # not the warm-up wait, nor the untimed tail step
        assert sim.log.index(("dispatch", i + 1)) < sim.log.index(("wait", i))


def test_statistics_on_known_samples():
    t = Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert t.median_s == 3.0
    assert t.p10_s == pytest.approx(1.4)
    assert t.p90_s == pytest.approx(61.6)
    assert t.cv == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1) / 22.0)
