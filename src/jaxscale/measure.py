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
    flops_note: str | None
    model_flops_per_step: float | None
    achieved_tflops_per_device: float | None
    mfu: float | None
    hfu: float | None
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
    xla_flops_per_step: float | None = None
    xla_bytes_accessed_per_device: float | None = None
    custom_call_flops_per_step: float | None = None
    arithmetic_intensity: float | None = None
    ridge_point: float | None = None
    bound: str | None = None
    predicted_comm_s: float | None = None
    kernels_per_step: int | None = None
    predicted_step_time_s: float | None = None
    predicted_roofline_s: float | None = None
    predicted_compute_s: float | None = None
    predicted_memory_s: float | None = None
    predicted_compute_bound_s: float | None = None
    predicted_memory_bound_s: float | None = None
    predicted_exposed_comm_s: float | None = None
    predicted_overlapped_step_s: float | None = None
    predicted_exposed_step_s: float | None = None
    predicted_mfu: float | None = None
    roofline_eta_compute: float | None = None
    roofline_eta_memory: float | None = None
    roofline_efficiency: str | None = None

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
    efficiency=None,
    torus: tuple[int, ...] | None = None,
) -> StepProfile:
    """Combine a timing with the program's counts, XLA's memory analysis and the peak table into a StepProfile.

    FLOPs, HBM bytes and kernels come from the optimized HLO (hlo_cost.program_stats),
    the predicted terms and ``bound`` from the roofline model of the same program
    (roofline.Schedule), so a measured row can be set beside its prediction.

    Args:
      timing: per-step samples of the step.
      compile_s: wall time of lowering and compiling it.
      cost: XLA cost analysis of the per-device program (kept for callers; the
        counts come from the HLO).
      memory: XLA CompiledMemoryStats (or None).
      hlo_text: optimized HLO of the per-device program.
      devices: the devices the step runs on.
      peak: a devices.PeakInfo, or None to leave MFU empty.
      model_flops: analytic FLOPs per step over all devices, or None.
      mesh: the step's jax Mesh (devices in the order of the HLO's device
        assignment); its axes get a link and a predicted time each. Default:
        the devices as one axis named ``data``.
      efficiency: roofline.Efficiency for the predicted terms (default: the datasheet's).
      torus: the TPU slice's shape (default: read off the devices' coordinates).
    """
    del cost
    devices = list(devices)
    n = len(devices)
    step = timing.median_s
    peak_tflops, bandwidth_gbs = peak.for_devices(n) if peak else (None, None)
    comm = predict_comm(hlo_text, mesh if mesh is not None else np.array(devices), peak, torus)
    figures = program_figures(hlo_text, comm, peak_tflops, bandwidth_gbs, n, model_flops, efficiency)
    xla_flops = figures.columns.get("xla_flops_per_step")
    achieved = (model_flops if model_flops is not None else xla_flops)
    achieved_tflops = achieved / step / n / 1e12 if achieved is not None else None
    mfu = model_flops / (step * n * peak_tflops * 1e12) if (model_flops is not None and peak_tflops) else None
    hfu = xla_flops / (step * n * peak_tflops * 1e12) if (xla_flops is not None and peak_tflops) else None
    notes = [x for x in (peak.note if peak else "", figures.note, comm.note) if x]
    peak_bytes, limit = device_memory(devices)
    d0 = devices[0]
    local = peak.local_link if peak else None
    return StepProfile(
        n_devices=n, device_kind=d0.device_kind, backend=d0.platform, compile_s=compile_s,
        warmup_s=timing.warmup_s, step_time_s=step, step_time_p10_s=timing.p10_s, step_time_p90_s=timing.p90_s,
        step_time_cv=timing.cv,
        step_time_mean_s=timing.mean_s, n_timed_steps=len(timing.samples_s), step_time_samples_s=timing.samples_s,
        **compiled_memory(memory), peak_bytes_in_use=peak_bytes, bytes_limit=limit,
        peak_tflops_per_device=peak_tflops, peak_dtype=peak.dtype if peak else None,
        peak_precision=peak.precision if peak else None,
        peak_source=peak.source if peak else None, peak_reference=peak.reference if peak else None,
        flops_note="; ".join(notes) or None,
        model_flops_per_step=model_flops, achieved_tflops_per_device=achieved_tflops, mfu=mfu, hfu=hfu,
        comm_bandwidth_gbytes_per_s=local.gbytes_per_s if local else None,
        comm_bandwidth_source=f"{local.name}: {local.source}" if local and local.gbytes_per_s else None,
        **comm.collectives.columns(), **comm.axis_columns(), **figures.columns,
    )


@dataclasses.dataclass(frozen=True)
class ProgramFigures:
    """What the optimized HLO says of one step, as row columns, and the schedule they came from.

    Attributes:
      stats: hlo_cost.ProgramStats of the per-device program.
      schedule: its roofline.Schedule (re-predicted by a calibration).
      columns: the row's counting and predicted columns (xla_flops_per_step,
        custom_call_flops_per_step, xla_bytes_accessed_per_device, kernels_per_step,
        arithmetic_intensity, ridge_point, bound, predicted_*, roofline_*).
      note: why a figure is empty, or how custom kernels were counted.
    """

    stats: Any
    schedule: Any
    columns: dict
    note: str


def program_figures(hlo_text: str, comm: "CommPrediction", peak_tflops: float | None, hbm_gbytes_per_s: float | None,
                    n_devices: int, model_flops: float | None, efficiency=None) -> ProgramFigures:
    """Counts and the roofline prediction of a per-device program (shared by measured and planned rows).

    ``xla_flops_per_step`` is left empty, with the reason in the note, where the
    count cannot be trusted (a loop whose trip count cannot be read, a kernel
    whose FLOPs cannot be counted): never a wrong number.
    """
    from jaxscale import hlo, hlo_cost, roofline

    module = hlo.parse(hlo_text)
    stats = hlo_cost.program_stats(module, n_devices)
    schedule = roofline.Schedule.from_hlo(module, comm.seconds_of)
    efficiency = efficiency or roofline.Efficiency()
    cols: dict = {"xla_flops_per_step": stats.flops * n_devices if stats.flops_trusted else None,
                  "custom_call_flops_per_step": stats.attention_flops * n_devices,
                  "xla_bytes_accessed_per_device": stats.hbm_bytes, "kernels_per_step": stats.kernels,
                  "predicted_comm_s": comm.seconds}
    notes = []
    if not stats.flops_trusted:
        notes.append(f"xla_flops_per_step left empty: {stats.flops_note}")
    elif stats.counted_kernels:
        notes.append(f"xla_flops_per_step includes {stats.flops_note}")
    if stats.flops_trusted and stats.hbm_bytes:
        cols["arithmetic_intensity"] = stats.flops / stats.hbm_bytes
    if peak_tflops and hbm_gbytes_per_s:
        cols["ridge_point"] = peak_tflops * 1e12 / (hbm_gbytes_per_s * 1e9)
        if comm.seconds is not None:
            t = schedule.predict(peak_tflops * 1e12, hbm_gbytes_per_s * 1e9, efficiency)
            cols.update(t.columns(), bound=t.bound, roofline_eta_compute=efficiency.compute,
                        roofline_eta_memory=efficiency.memory, roofline_efficiency=efficiency.source)
            if model_flops and t.step_s:
                cols["predicted_mfu"] = model_flops / (t.step_s * n_devices * peak_tflops * 1e12)
    return ProgramFigures(stats, schedule, cols, "; ".join(notes))


@dataclasses.dataclass(frozen=True)
class HiddenFlops:
    """FLOPs of the fused attention kernels (cuDNN, Pallas), which XLA's cost analysis does not see, per device
    per step."""

    flops_per_device: int
    calls: int
    note: str


def hidden_flops(hlo_text: str) -> HiddenFlops:
    """FLOPs of the fused attention kernels of a per-device HLO module, from their shapes (hlo_cost.program_stats).

    XLA's cost analysis counts none of them; hlo_cost.loop_corrected_cost leaves them out
    too, so that its FLOPs plus these are the whole step.
    """
    from jaxscale import hlo, hlo_cost

    module = hlo.parse(hlo_text)
    stats = hlo_cost.program_stats(module)
    calls = sum(module.multiplicity.get(k.computation, 0) for items in hlo_cost.kernels(module).values()
                for k in items if k.attention)
    notes = []
    if stats.attention_flops:
        notes.append(f"xla_flops_per_step includes {stats.attention_flops:.4g} FLOPs per device of {calls} fused "
                     "attention kernels that XLA's cost analysis does not count, from their shapes")
    if stats.opaque_kernels:
        notes.append(f"custom-call kernels whose FLOPs cannot be counted: {', '.join(stats.opaque_kernels)}; "
                     "xla_flops_per_step left empty")
    return HiddenFlops(int(stats.attention_flops), calls, "; ".join(notes))


@dataclasses.dataclass(frozen=True)
class CommPrediction:
    """Collectives of a step and their predicted time per mesh axis."""

    collectives: Any
    links: dict
    traffic_bytes: dict  # axis name -> ring traffic bytes per device
    seconds_by_axis: dict  # axis name -> seconds, None where the link has no figure
    seconds: float | None
    note: str
    per_collective: dict = dataclasses.field(default_factory=dict)  # key -> (seconds of one execution, axis)

    def seconds_of(self, key: str) -> tuple[float, str]:
        """(seconds of one execution, the axis it runs on) of a collective, by channel id or instruction name."""
        return self.per_collective.get(key, (0.0, ""))

    def axis_columns(self) -> dict:
        out = {}
        for axis in ("data", "model"):
            link = self.links.get(axis)
            out[f"comm_link_{axis}"] = link.label if link else None
            out[f"comm_link_{axis}_gbytes_per_s"] = link.gbytes_per_s if link else None
            out[f"collective_traffic_{axis}_bytes"] = int(self.traffic_bytes.get(axis, 0)) if link else None
            out[f"predicted_comm_{axis}_s"] = self.seconds_by_axis.get(axis) if link else None
        return out


def predict_comm(hlo_text: str, mesh, peak, torus: tuple[int, ...] | None = None) -> CommPrediction:
    """Collectives of a per-device HLO module and their time over the link of each mesh axis they run on.

    Each collective is attributed to the mesh axes its replica groups span
    (comms.collective_axes); one spanning several axes is charged to the
    slowest of their links. An axis's time is its ring traffic over its link's
    one-way bandwidth (on a TPU, over every torus dimension the axis spans,
    wraparounds included: devices.mesh_axis_links); the step's predicted_comm_s
    is the sum over axes (every collective in full, none overlapping another).

    Args:
      hlo_text: optimized HLO of the per-device program.
      mesh: a jax Mesh, or an array of devices (one axis named ``data``).
      peak: a devices.PeakInfo (its platform and links), or None.
      torus: a TPU slice's shape (default: read off the mesh devices' coordinates).
    """
    from jaxscale import devices as devinfo
    from jaxscale.comms import collective_axes, count_collectives

    if hasattr(mesh, "axis_names"):
        grid, names = np.asarray(mesh.devices, dtype=object), tuple(mesh.axis_names)
    else:
        grid = np.asarray(mesh, dtype=object).reshape(-1)
        names = ("data",)
    collectives = count_collectives(hlo_text, grid.size)
    platform = (peak.platform if peak and peak.platform else getattr(grid.flat[0], "platform", "cpu"))
    links = devinfo.mesh_axis_links(grid, names, platform, peak.local_link if peak else None,
                                    peak.remote_link if peak else None, torus)
    traffic = {name: 0.0 for name in names}
    per_collective = {}
    for c in collectives.items:
        axes = collective_axes([list(g) for g in c.groups], grid.shape)
        if not axes or not c.traffic_bytes:
            continue
        slowest = names[min(axes, key=lambda a: links[names[a]].gbytes_per_s or 0.0)]
        traffic[slowest] += c.traffic_bytes
        bw = links[slowest].gbytes_per_s
        per_collective[c.channel or c.name] = (c.full_bytes * c.ring_factor / (bw * 1e9) if bw else 0.0, slowest)
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
    return CommPrediction(collectives, links, traffic, seconds, total, note, per_collective)


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
