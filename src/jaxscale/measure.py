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
import re
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxscale import flops as flops_mod


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
    peak_precision: str | None
    peak_source: str | None
    peak_reference: str | None
    custom_call_flops_per_step: float | None
    flops_note: str | None
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
    comm_link_data: str | None = None
    comm_link_data_gbytes_per_s: float | None = None
    collective_traffic_data_bytes: int | None = None
    predicted_comm_data_s: float | None = None
    comm_link_model: str | None = None
    comm_link_model_gbytes_per_s: float | None = None
    collective_traffic_model_bytes: int | None = None
    predicted_comm_model_s: float | None = None
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
    mesh=None,
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
      mesh: the step's jax Mesh (devices in the order of the HLO's device
        assignment); its axes get a link and a predicted time each. Default:
        the devices as one axis named ``data``.
    """
    devices = list(devices)
    n = len(devices)
    step = timing.median_s
    hidden = hidden_flops(hlo_text)
    per_device_flops = cost.get("flops")
    if per_device_flops is not None:
        per_device_flops = per_device_flops + hidden.flops_per_device
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
    comm = predict_comm(hlo_text, mesh if mesh is not None else np.array(devices), peak)
    notes = [x for x in (peak.note if peak else "", hidden.note, comm.note) if x]
    peak_bytes, limit = device_memory(devices)
    d0 = devices[0]
    local = peak.local_link if peak else None
    return StepProfile(
        n_devices=n, device_kind=d0.device_kind, backend=d0.platform, compile_s=compile_s,
        warmup_s=timing.warmup_s, step_time_s=step, step_time_p10_s=timing.p10_s, step_time_p90_s=timing.p90_s,
        step_time_cv=timing.cv,
        step_time_mean_s=timing.mean_s, n_timed_steps=len(timing.samples_s), step_time_samples_s=timing.samples_s,
        xla_flops_per_step=xla_flops, xla_bytes_accessed_per_device=bytes_accessed,
        **compiled_memory(memory), peak_bytes_in_use=peak_bytes, bytes_limit=limit,
        peak_tflops_per_device=peak_tflops, peak_dtype=peak.dtype if peak else None,
        peak_precision=peak.precision if peak else None,
        peak_source=peak.source if peak else None, peak_reference=peak.reference if peak else None,
        custom_call_flops_per_step=hidden.flops_per_device * n, flops_note="; ".join(notes) or None,
        model_flops_per_step=model_flops, achieved_tflops_per_device=achieved_tflops, mfu=mfu, hfu=hfu,
        arithmetic_intensity=intensity, ridge_point=ridge, bound=bound, predicted_comm_s=comm.seconds,
        comm_bandwidth_gbytes_per_s=local.gbytes_per_s if local else None,
        comm_bandwidth_source=f"{local.name}: {local.source}" if local and local.gbytes_per_s else None,
        **comm.collectives.columns(), **comm.axis_columns(),
    )


@dataclasses.dataclass(frozen=True)
class HiddenFlops:
    """FLOPs of kernels XLA's cost analysis cannot see (fused attention custom calls), per device per step."""

    flops_per_device: int
    calls: int
    note: str


def hidden_flops(hlo_text: str) -> HiddenFlops:
    """Analytic FLOPs of the cuDNN fused-attention calls in a per-device HLO module (flops.attention_call_flops)."""
    from jaxscale.comms import attention_calls

    calls = attention_calls(hlo_text) if "__cudnn$fmha" in hlo_text else []
    total = sum(flops_mod.attention_call_flops(c.batch, c.heads, c.q_len, c.kv_len, c.head_dim, backward=c.backward,
                                               causal=c.causal, flash=c.flash) * c.times for c in calls)
    notes = []
    if calls:
        notes.append(f"xla_flops_per_step includes {total:.4g} FLOPs per device of {sum(c.times for c in calls)} "
                     f"fused attention custom calls ({', '.join(sorted({c.target for c in calls}))}) that XLA's "
                     "cost analysis does not count, from their shapes")
    kernels = sorted({t for t in re.findall(r'custom_call_target="([^"]+)"', hlo_text) if t in _OPAQUE_KERNELS})
    if kernels:
        notes.append(f"custom-call kernels whose FLOPs XLA's cost analysis may not count and jaxscale cannot "
                     f"infer: {', '.join(kernels)}; HFU may be low")
    return HiddenFlops(int(total), sum(c.times for c in calls), "; ".join(notes))


# Custom calls that run user-written kernels (Pallas on TPU through Mosaic, Pallas on GPU through Triton or
# Mosaic GPU): arithmetic XLA sees only as far as the kernel's own cost estimate, if it has one.
_OPAQUE_KERNELS = {"tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2"}


@dataclasses.dataclass(frozen=True)
class CommPrediction:
    """Collectives of a step and their predicted time per mesh axis."""

    collectives: Any
    links: dict
    traffic_bytes: dict  # axis name -> ring traffic bytes per device
    seconds_by_axis: dict  # axis name -> seconds, None where the link has no figure
    seconds: float | None
    note: str

    def axis_columns(self) -> dict:
        out = {}
        for axis in ("data", "model"):
            link = self.links.get(axis)
            out[f"comm_link_{axis}"] = link.label if link else None
            out[f"comm_link_{axis}_gbytes_per_s"] = link.gbytes_per_s if link else None
            out[f"collective_traffic_{axis}_bytes"] = int(self.traffic_bytes.get(axis, 0)) if link else None
            out[f"predicted_comm_{axis}_s"] = self.seconds_by_axis.get(axis) if link else None
        return out


def predict_comm(hlo_text: str, mesh, peak) -> CommPrediction:
    """Collectives of a per-device HLO module and their time over the link of each mesh axis they run on.

    Each collective is attributed to the mesh axes its replica groups span
    (comms.collective_axes); one spanning several axes is charged to the
    slowest of their links. An axis's time is its ring traffic over its link's
    one-way bandwidth; the step's predicted_comm_s is the sum over axes
    (collectives are assumed not to overlap each other).

    Args:
      hlo_text: optimized HLO of the per-device program.
      mesh: a jax Mesh, or an array of devices (one axis named ``data``).
      peak: a devices.PeakInfo (its platform and links), or None.
    """
    from jaxscale import devices as devinfo
    from jaxscale.comms import count_collectives

    if hasattr(mesh, "axis_names"):
        grid, names = np.asarray(mesh.devices, dtype=object), tuple(mesh.axis_names)
    else:
        grid = np.asarray(mesh, dtype=object).reshape(-1)
        names = ("data",)
    collectives = count_collectives(hlo_text, grid.size)
    platform = (peak.platform if peak and peak.platform else getattr(grid.flat[0], "platform", "cpu"))
    links = devinfo.mesh_axis_links(grid, names, platform, peak.local_link if peak else None,
                                    peak.remote_link if peak else None)
    traffic = {name: 0.0 for name in names}
    for axes, nbytes in collectives.traffic_by_axes(grid.shape).items():
        if not axes:
            continue
        slowest = min(axes, key=lambda a: links[names[a]].gbytes_per_s or 0.0)
        traffic[names[slowest]] += nbytes
    seconds = {}
    for name in names:
        bw = links[name].gbytes_per_s
        seconds[name] = 0.0 if traffic[name] == 0 else (traffic[name] / (bw * 1e9) if bw else None)
    missing = [f"{n} ({links[n].label})" for n in names if seconds[n] is None]
    note = ""
    if missing:
        note = f"no bandwidth figure for the link of mesh axis {', '.join(missing)}: predicted_comm_s left empty"
    if collectives.unknown_trip_counts:
        note = "; ".join(filter(None, [note, f"{collectives.unknown_trip_counts} loop(s) with no readable trip "
                                              "count: their collectives were counted once"]))
    total = None if missing else float(sum(seconds.values()))
    return CommPrediction(collectives, links, traffic, seconds, total, note)


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
    meshes = [leaf.sharding.mesh for leaf in jax.tree.leaves(args)
              if isinstance(leaf, jax.Array) and isinstance(leaf.sharding, jax.sharding.NamedSharding)]
    mesh = next((m for m in meshes if m.devices.size == len(used)), None)
    # The matmuls run in bf16 when any floating argument is bf16; float32 otherwise.
    floats = [leaf.dtype for leaf in jax.tree.leaves(args) if hasattr(leaf, "dtype")
              and jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)]
    dtype = "bfloat16" if any(d == jax.numpy.bfloat16 for d in floats) else "float32"
    timing = time_pipelined(lambda i: compiled(*args), n_steps, warmup)
    if peak_tflops is not None:
        peak = devinfo.PeakInfo(tflops=peak_tflops, dtype=dtype, source="given", reference="profile_step(peak_tflops=)",
                                hbm_gbytes_per_s=None, interconnect_gbytes_per_s=None, interconnect="unknown",
                                memory_bytes=None, precision="given by the caller")
    else:
        peak = devinfo.resolve_peak(dtype)
    try:
        memory = compiled.memory_analysis()
    except Exception:
        memory = None
    return describe_step(timing=timing, compile_s=compile_s, cost=cost_dict(compiled), memory=memory,
                         hlo_text=compiled.as_text() or "", devices=used, peak=peak, model_flops=model_flops,
                         mesh=mesh)
