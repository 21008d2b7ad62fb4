"""Warm up, then time a step: raw per-step samples first, statistics after.

Timing is pipelined. Steps are dispatched asynchronously with two in flight;
the host blocks on step i's output only after step i+1 has been queued, and
records the moment each step's output becomes ready. A step's duration is the
interval between two consecutive completions. Because the next step is always
queued before the host waits, the device never idles on the host, so host
dispatch overhead does not inflate short steps, yet every step still gets its
own sample for the spread (p10, p90, cv). ``time_blocking`` (dispatch, block,
repeat) is kept for comparison: it includes the dispatch latency in each step.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-step wall times of the timed steps and their statistics (seconds)."""

    samples_s: tuple[float, ...]
    warmup_s: float = 0.0  # wall time of the untimed warm-up steps (first execution included)

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.samples_s))

    @property
    def mean_s(self) -> float:
        return float(np.mean(self.samples_s))

    @property
    def p10_s(self) -> float:
        return float(np.percentile(self.samples_s, 10))

    @property
    def p90_s(self) -> float:
        return float(np.percentile(self.samples_s, 90))

    @property
    def cv(self) -> float:
        """Coefficient of variation: sample standard deviation / mean."""
        if len(self.samples_s) < 2:
            return 0.0
        return float(np.std(self.samples_s, ddof=1) / np.mean(self.samples_s))


def time_pipelined(dispatch: Callable[[int], Any], n_steps: int, warmup: int) -> Timing:
    """Time ``n_steps`` calls of ``dispatch(i)`` after ``warmup`` untimed ones.

    Args:
      dispatch: enqueues step i and returns something to block on (its loss).
        Successive steps must depend on each other (donated state), so the device
        runs them in order.
      n_steps: number of timed steps (samples).
      warmup: untimed steps run first; at least one is always run, since the
        first call also pays one-time costs (allocation, autotuning).

    Returns:
      Timing with ``n_steps`` samples.
    """
    i = 0
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        out = dispatch(i)
        i += 1
    jax.block_until_ready(out)
    warmup_s = time.perf_counter() - start
    # n_steps + 1 completions give n_steps intervals. Each is stamped only after
    # its successor was dispatched, the last included (an untimed tail step), so
    # every interval has the same structure whether the backend dispatches
    # asynchronously or runs a step inside the dispatch call.
    pending = collections.deque([dispatch(i)])
    i += 1
    stamps = []
    while len(stamps) < n_steps + 1:
        pending.append(dispatch(i))
        i += 1
        jax.block_until_ready(pending.popleft())
        stamps.append(time.perf_counter())
    jax.block_until_ready(pending.popleft())
    return Timing(tuple(float(b - a) for a, b in zip(stamps, stamps[1:])), warmup_s=warmup_s)


def time_blocking(dispatch: Callable[[int], Any], n_steps: int, warmup: int) -> Timing:
    """Per-step blocking: dispatch, wait, repeat. Includes host dispatch latency."""
    i = 0
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(dispatch(i))
        i += 1
    samples = []
    for _ in range(n_steps):
        start = time.perf_counter()
        jax.block_until_ready(dispatch(i))
        samples.append(time.perf_counter() - start)
        i += 1
    return Timing(tuple(samples))


def device_memory(devices) -> tuple[int | None, int | None]:
    """(largest peak_bytes_in_use, smallest bytes_limit) over the addressable devices.

    None where the backend keeps no allocator statistics (the CPU). The peak is
    the allocator's high-water mark since the process started.
    """
    peaks, limits = [], []
    for d in devices:
        if d.process_index != jax.process_index():
            continue
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if not stats:
            continue
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
        if "bytes_limit" in stats:
            limits.append(int(stats["bytes_limit"]))
    return (max(peaks) if peaks else None), (min(limits) if limits else None)


# ------------------------------------------------------------- step profiles


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """What jaxscale measures of one compiled step; field names are CSV columns.

    Per-device figures are for one device of the step's mesh; FLOPs per step are
    summed over devices. Fields that a backend cannot report are None.
    """

    n_devices: int
    device_kind: str
    backend: str
    compile_s: float
    warmup_s: float
    step_time_s: float
    step_time_p10_s: float
    step_time_p90_s: float
    step_time_cv: float
    step_time_mean_s: float
    n_timed_steps: int
    step_time_samples_s: tuple[float, ...]
    xla_flops_per_step: float | None
    xla_bytes_accessed_per_device: float | None
    compiled_argument_bytes: int | None
    compiled_output_bytes: int | None
    compiled_temp_bytes: int | None
    compiled_alias_bytes: int | None
    compiled_total_bytes: int | None
    peak_bytes_in_use: int | None
    bytes_limit: int | None
    peak_tflops_per_device: float | None
    peak_dtype: str | None
    peak_source: str | None
    peak_reference: str | None
    model_flops_per_step: float | None
    achieved_tflops_per_device: float | None
    mfu: float | None
    hfu: float | None
    arithmetic_intensity: float | None
    ridge_point: float | None
    bound: str | None
    predicted_comm_s: float | None
    comm_bandwidth_gbytes_per_s: float | None
    comm_bandwidth_source: str | None
    all_reduce_bytes: int = 0
    all_reduce_count: int = 0
    all_gather_bytes: int = 0
    all_gather_count: int = 0
    reduce_scatter_bytes: int = 0
    reduce_scatter_count: int = 0
    all_to_all_bytes: int = 0
    all_to_all_count: int = 0
    collective_permute_bytes: int = 0
    collective_permute_count: int = 0
    collective_traffic_bytes: int = 0

    def to_row(self) -> dict:
        """The fields as a CSV row dict (samples joined with ';')."""
        row = dataclasses.asdict(self)
        row["step_time_samples_s"] = ";".join(f"{s:.6g}" for s in self.step_time_samples_s)
        return row


def compiled_memory(memory) -> dict:
    """Per-device bytes from XLA's CompiledMemoryStats; total = argument + output + temp − alias."""
    if memory is None:
        return {k: None for k in ("compiled_argument_bytes", "compiled_output_bytes", "compiled_temp_bytes",
                                  "compiled_alias_bytes", "compiled_total_bytes")}
    arg, out = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
    temp, alias = int(memory.temp_size_in_bytes), int(memory.alias_size_in_bytes)
    return {"compiled_argument_bytes": arg, "compiled_output_bytes": out, "compiled_temp_bytes": temp,
            "compiled_alias_bytes": alias, "compiled_total_bytes": arg + out + temp - alias}


def describe_step(
    *,
    timing: Timing,
    compile_s: float,
    cost: dict,
    memory,
    hlo_text: str,
    devices,
    peak,
    model_flops: float | None,
) -> StepProfile:
    """Combine a timing with XLA's analyses and the peak table into a StepProfile.

    Args:
      timing: per-step samples of the step.
      compile_s: wall time of lowering and compiling it.
      cost: XLA cost analysis of the per-device program.
      memory: XLA CompiledMemoryStats (or None).
      hlo_text: optimized HLO of the per-device program.
      devices: the devices the step runs on.
      peak: a devices.PeakInfo, or None to leave MFU empty.
      model_flops: analytic FLOPs per step over all devices, or None.
    """
    from jaxscale.comms import count_collectives

    devices = list(devices)
    n = len(devices)
    step = timing.median_s
    per_device_flops = cost.get("flops")
    xla_flops = per_device_flops * n if per_device_flops is not None else None
    bytes_accessed = cost.get("bytes accessed")
    peak_tflops, bandwidth_gbs = peak.for_devices(n) if peak else (None, None)
    achieved = (model_flops if model_flops is not None else xla_flops)
    achieved_tflops = achieved / step / n / 1e12 if achieved is not None else None
    mfu = model_flops / (step * n * peak_tflops * 1e12) if (model_flops is not None and peak_tflops) else None
    hfu = xla_flops / (step * n * peak_tflops * 1e12) if (xla_flops is not None and peak_tflops) else None
    intensity = per_device_flops / bytes_accessed if per_device_flops and bytes_accessed else None
    ridge = peak_tflops * 1e12 / (bandwidth_gbs * 1e9) if peak_tflops and bandwidth_gbs else None
    bound = None if intensity is None or ridge is None else ("compute" if intensity >= ridge else "memory")
    comms = count_collectives(hlo_text, n)
    bandwidth = peak.interconnect_gbytes_per_s if peak else None
    predicted = comms.traffic_bytes / (bandwidth * 1e9) if bandwidth else (0.0 if comms.traffic_bytes == 0 else None)
    peak_bytes, limit = device_memory(devices)
    d0 = devices[0]
    return StepProfile(
        n_devices=n, device_kind=d0.device_kind, backend=d0.platform, compile_s=compile_s,
        warmup_s=timing.warmup_s, step_time_s=step, step_time_p10_s=timing.p10_s, step_time_p90_s=timing.p90_s,
        step_time_cv=timing.cv,
        step_time_mean_s=timing.mean_s, n_timed_steps=len(timing.samples_s), step_time_samples_s=timing.samples_s,
        xla_flops_per_step=xla_flops, xla_bytes_accessed_per_device=bytes_accessed,
        **compiled_memory(memory), peak_bytes_in_use=peak_bytes, bytes_limit=limit,
        peak_tflops_per_device=peak_tflops, peak_dtype=peak.dtype if peak else None,
        peak_source=peak.source if peak else None, peak_reference=peak.reference if peak else None,
        model_flops_per_step=model_flops, achieved_tflops_per_device=achieved_tflops, mfu=mfu, hfu=hfu,
        arithmetic_intensity=intensity, ridge_point=ridge, bound=bound, predicted_comm_s=predicted,
        comm_bandwidth_gbytes_per_s=bandwidth, comm_bandwidth_source=(peak.interconnect if bandwidth else None),
        **comms.columns(),
    )


def profile_step(fn, *args, n_steps: int = 10, warmup: int = 2, model_flops: float | None = None,
                 peak_tflops: float | None = None) -> StepProfile:
    """Profile any jitted (or jittable) function on the shardings its arguments carry.

    The function is lowered and compiled for ``args`` (timed as compile_s), run
    ``warmup`` times, then ``n_steps`` times with pipelined timing. Arguments are
    reused on every call, so ``fn`` must not donate them.

    Args:
      fn: the step, e.g. ``jax.jit(train_step)``; a plain function is jitted.
      *args: its arguments (jax Arrays carry their shardings).
      n_steps: timed steps.
      warmup: untimed steps first.
      model_flops: your FLOPs per step over all devices; enables ``mfu``.
      peak_tflops: peak TFLOP/s per device to use instead of the table/calibration.

    Returns:
      A StepProfile (``.to_row()`` for a CSV row).
    """
    from jaxscale import devices as devinfo
    from jaxscale.step import cost_dict

    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - start
    used = set()
    for leaf in jax.tree.leaves(args):
        if isinstance(leaf, jax.Array):
            used |= set(leaf.sharding.device_set)
    used = sorted(used, key=lambda d: d.id) or [jax.devices()[0]]
    timing = time_pipelined(lambda i: compiled(*args), n_steps, warmup)
    if peak_tflops is not None:
        peak = devinfo.PeakInfo(tflops=peak_tflops, dtype="", source="given", reference="profile_step(peak_tflops=)",
                                hbm_gbytes_per_s=None, interconnect_gbytes_per_s=None, interconnect="unknown",
                                memory_bytes=None)
    else:
        peak = devinfo.resolve_peak("bfloat16" if used[0].platform != "cpu" else "float32")
    try:
        memory = compiled.memory_analysis()
    except Exception:
        memory = None
    return describe_step(timing=timing, compile_s=compile_s, cost=cost_dict(compiled), memory=memory,
                         hlo_text=compiled.as_text() or "", devices=used, peak=peak, model_flops=model_flops)
