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
    import jaxscale.measure as measure

    sim = _SimulatedDevice(host_s, device_s)
    monkeypatch.setattr(measure, "time", sim)
    blocking = time_blocking(sim.dispatch, 8, 1)
    assert blocking.samples_s == pytest.approx([host_s + device_s] * 8)
    sim = _SimulatedDevice(host_s, device_s)
    monkeypatch.setattr(measure, "time", sim)
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


DATA = __import__("pathlib").Path(__file__).parent / "data"


def _describe(hlo_text: str, cost_flops: float, peak):
    from jaxscale.measure import describe_step

    return describe_step(timing=Timing((0.5, 0.5, 0.5)), compile_s=1.0, cost={"flops": cost_flops}, memory=None,
                         hlo_text=hlo_text, devices=jax.devices()[:1], peak=peak, model_flops=1e12)


def test_fused_attention_custom_calls_add_their_flops_to_the_xla_count():
    """The HLO fixture is hand-written in the form XLA's GPU compiler gives cuDNN flash attention: a causal
    forward call and its backward call, each in a 2-trip layer loop. XLA's cost analysis does not count them;
    the row counts them from their shapes: forward 2 matmuls, backward 4 + the recomputed QKᵀ, causal kernels
    doing half the square. The row's FLOPs come from the HLO, not from the cost analysis it is handed."""
    from jaxscale.devices import spec_peak

    hlo = (DATA / "cudnn_fmha_causal.hlo").read_text()
    one_matmul = 2 * 2 * 4 * 128 * 128 * 64
    hidden = 2 * (2 * one_matmul // 2) + 2 * (5 * one_matmul // 2)
    peak = spec_peak("NVIDIA H100 80GB HBM3", "gpu", "bfloat16")
    prof = _describe(hlo, 3e9, peak)
    assert prof.custom_call_flops_per_step == hidden
    assert prof.xla_flops_per_step == hidden  # the loop counters' adds are scalar bookkeeping
    assert prof.hfu == pytest.approx(hidden / (0.5 * 1 * 989.5e12))
    assert "cuDNN attention" in prof.flops_note
    # the predicted terms of the same program: 4 attention kernels, memory-bound at these small shapes
    assert prof.kernels_per_step == 4 and prof.bound == "memory"
    assert prof.predicted_compute_s == pytest.approx(hidden / 989.5e12)
    assert prof.predicted_step_time_s >= prof.predicted_compute_s
    plain = _describe("ENTRY %main {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n", 3e9, peak)
    assert plain.custom_call_flops_per_step == 0 and plain.xla_flops_per_step == 0 and plain.flops_note is None


def test_a_math_mode_without_a_datasheet_peak_leaves_mfu_empty_with_the_reason():
    from jaxscale.devices import spec_peak

    tpu = spec_peak("TPU v5 lite", "tpu", "float32", precision="highest")
    prof = _describe("ENTRY %main {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n", 3e9, tpu)
    assert prof.mfu is None and prof.hfu is None and prof.peak_tflops_per_device is None
    assert "6 bf16 MXU passes" in prof.flops_note and "MFU" in prof.flops_note
    gpu = _describe("ENTRY %main {\n  ROOT %p = f32[4]{0} parameter(0)\n}\n", 3e9,
                    spec_peak("NVIDIA A100-SXM4-80GB", "gpu", "float32"))
    assert gpu.peak_dtype == "tf32" and gpu.peak_tflops_per_device == 156.0
    assert gpu.mfu == pytest.approx(1e12 / (0.5 * 156e12)) and "TF32" in gpu.peak_precision


def test_opaque_kernels_are_flagged_not_guessed():
    """A Pallas kernel without a cost estimate cannot be counted: the row leaves its FLOPs empty and says why."""
    from jaxscale.devices import spec_peak
    from jaxscale.measure import hidden_flops

    pallas = ('ENTRY %main {\n  %a = f32[128,128]{1,0} parameter(0)\n  ROOT %k = f32[128,128]{1,0} custom-call(%a), '
              'custom_call_target="tpu_custom_call", backend_config="{}"\n}\n')
    hidden = hidden_flops(pallas)
    assert hidden.flops_per_device == 0 and "tpu_custom_call" in hidden.note
    prof = _describe(pallas, 3e9, spec_peak("TPU v5 lite", "tpu", "bfloat16"))
    assert prof.xla_flops_per_step is None and prof.hfu is None and "tpu_custom_call" in prof.flops_note
    assert prof.mfu is not None  # model FLOPs do not depend on the count
    tpu_internal = pallas.replace("tpu_custom_call", "AllocateBuffer")  # no arithmetic: no note
    assert hidden_flops(tpu_internal).note == ""
