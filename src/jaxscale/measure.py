"""One point → one row: measured (compile and time it here) or planned (compile it for a target, predict it).

The only row builder. Every row starts from ``base_row`` (grid, run settings,
runtime, analytic counts) and takes the compiled program's columns from the
same code; a measured row then adds its timings (``describe_step``), a planned
row its predicted step (prediction.py). Failures come back as rows with a
failure status (``compile_error``, ``oom``, ``over_budget``, ``error``), never
raised. ``profile_step`` measures any jitted function the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxscale import flops, roofline
from jaxscale.config import Profile
from jaxscale.devices import PeakInfo, resolve_peak, spec_peak
from jaxscale.grid import Point
from jaxscale.memory import MemoryBudget, compiled_memory, device_memory
from jaxscale.prediction import hidden_flops, predict_comm, program_figures
from jaxscale.records import SCHEMA_VERSION, error_text
from jaxscale.step import CompiledStep, build_step, compile_point, compile_step, cost_dict
from jaxscale.targets import Target, runtime_columns, slice_devices
from jaxscale.timing import Timing, time_pipelined

# Seams for the tests' fault injection (tests/hooks/jaxscale_faults.py), None in use:
# before_step(point, i) runs before a measured step's i-th dispatch (it may raise, or end the process);
# after_point(row) sees each row that compiled (and, measured, ran) before it is recorded (it may change it).
before_step: Callable[[Point, int], None] | None = None
after_point: Callable[[dict], None] | None = None


def base_row(point: Point, profile: Profile, columns: dict) -> dict:
    """The columns of a point's row known before it compiles: grid, run settings, runtime, analytic counts."""
    run, m = profile.run, point.model
    row = {**point.grid_columns(), "dtype": run.dtype, "attention": run.attention, "scan_layers": run.scan_layers,
           "profile": run.name, "row_source": "measured", "schema_version": SCHEMA_VERSION,
           "timestamp_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           **columns, "status": "ok", "error": ""}
    row.update(params=flops.param_count(m.d_model, m.n_layers, m.vocab, m.d_ff),
               tokens_per_step=point.global_batch * m.seq_len,
               model_flops_per_step=flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch,
                                                      m.d_ff, recompute=False, causal=run.causal_flops),
               attention_flops=flops.ATTENTION_CAUSAL if run.causal_flops else flops.ATTENTION_FULL)
    return row


def _program_columns(program, compile_s: float) -> dict:
    """Columns of a compiled step's program: the attention kernel, compile time, parameter and state bytes."""
    return {"attention_impl": program.attention.impl if program.attention else None,
            "attention_note": program.attention.note if program.attention else None,
            "compile_s": compile_s, "params": program.params, "param_bytes": program.param_bytes,
            "opt_state_bytes": program.opt_state_bytes}


def flops_ratio(point: Point, xla_flops: float, custom_call_flops: float | None) -> tuple[float, str]:
    """(the HLO's FLOPs over the analytic count of the step it compiled, a note where they disagree).

    The analytic count is the one the program does: recompute included under
    ``remat = "full"``, attention over the whole square, except that fused
    attention kernels (counted from their shapes, ``custom_call_flops``) stand
    in for attention's matmuls. Outside 0.95–1.25 the note says so: the norms,
    softmax, loss and AdamW explain a few percent, not more.
    """
    m, recompute = point.model, point.remat == "full"
    full = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                             recompute=recompute, causal=False)
    analytic = full
    if custom_call_flops:
        causal = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                                   recompute=recompute, causal=True)
        analytic += custom_call_flops - 2 * (full - causal)
    ratio = xla_flops / analytic
    if 0.95 <= ratio <= 1.25:
        return ratio, ""
    return ratio, (f"the HLO counts {ratio:.2f}x the analytic FLOPs with "
                   f"{'its fused attention kernels' if custom_call_flops else 'full attention'}"
                   f"{' and recompute' if recompute else ''}: beyond the norms, softmax, loss and AdamW work that "
                   "explains a few percent")


def _classify(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
        return "oom"
    return "error"


# ------------------------------------------------------------- measured rows


def measure_point(point: Point, profile: Profile, peak: PeakInfo, columns: dict, trace_dir: Path | None = None,
                  memory: MemoryBudget | None = None) -> dict:
    """Compile and time one grid point on this process's devices; failures come back as a row, never raised.

    Args:
      point: the grid point.
      profile: its profile (run settings).
      peak: the run's PeakInfo (devices.resolve_peak).
      columns: the runtime's columns of a row (targets.runtime_columns).
      trace_dir: where jax.profiler writes the point's trace, or None.
      memory: the budget a point may plan to use per device, or None for none.

    Returns:
      The row as a dict of schema columns.
    """
    run = profile.run
    row = base_row(point, profile, columns)
    budget = memory.budget_bytes if memory else None
    if memory:
        row["device_memory_bytes"], row["bytes_limit"] = memory.device_memory_bytes, memory.bytes_limit
    try:
        compiled = compile_point(point, run)
    except Exception as exc:  # XLA and tracing errors come in many types
        row.update(status="compile_error" if _classify(exc) != "oom" else "oom", error=error_text(exc, 500))
        return row
    row.update(_program_columns(compiled, compiled.compile_s))
    row["hosts"] = ";".join(sorted({f"p{d.process_index}" for d in compiled.mesh.devices.flat}))
    planned = compiled_memory(compiled.memory)["compiled_total_bytes"]
    over = budget is not None and planned is not None and planned > budget
    if jax.process_count() > 1:  # every process must take the same branch, or collectives would hang
        from jax.experimental import multihost_utils

        over = bool(multihost_utils.broadcast_one_to_all(np.int32(over)))
    if over:
        row.update(status="over_budget", error=f"compiled step needs {planned} bytes per device, over the budget "
                                               f"of {budget}: max_memory_fraction={run.max_memory_fraction} of the "
                                               f"device's {memory.device_memory_bytes} bytes ({memory.source})")
        _fill_compiled_columns(row, compiled)
        return row
    try:
        timed = _run_compiled(compiled, run, point, peak, row["model_flops_per_step"], trace_dir)
    except Exception as exc:
        row.update(status=_classify(exc), error=error_text(exc, 500))
        _fill_compiled_columns(row, compiled)
        gc.collect()
        return row
    row.update(timed)
    if after_point is not None:
        after_point(row)
    if trace_dir is not None:
        row["trace_dir"] = str(trace_dir)
    return row


def _fill_compiled_columns(row: dict, compiled: CompiledStep) -> None:
    """The memory and FLOP columns of a point that compiled but did not run."""
    row.update(compiled_memory(compiled.memory))
    flops_ = compiled.cost.get("flops")
    if flops_ is not None:
        hidden = hidden_flops(compiled.hlo_text)
        row["xla_flops_per_step"] = (flops_ + hidden.flops_per_device) * compiled.point.n_devices
        row["custom_call_flops_per_step"] = hidden.flops_per_device * compiled.point.n_devices


def _run_compiled(compiled: CompiledStep, run, point: Point, peak, model_flops: float, trace_dir) -> dict:
    params, opt_state = compiled.init_state()
    batches = [compiled.make_batch(i) for i in range(2)]
    state = {"params": params, "opt": opt_state}
    losses = []
    hook = before_step

    def dispatch(i: int):
        if hook is not None:
            hook(point, i)
        state["params"], state["opt"], loss = compiled.compiled(state["params"], state["opt"], batches[i % 2])
        losses.append(loss)
        return loss

    if trace_dir is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(trace_dir)):
            timing = time_pipelined(dispatch, run.steps, run.warmup)
    else:
        timing = time_pipelined(dispatch, run.steps, run.warmup)
    step = describe_step(timing=timing, compile_s=compiled.compile_s, cost=compiled.cost, memory=compiled.memory,
                         hlo_text=compiled.hlo_text, devices=list(compiled.mesh.devices.flat), peak=peak,
                         model_flops=model_flops, mesh=compiled.mesh).to_row()
    out = {k: v for k, v in step.items() if k not in ("n_devices",)}
    out["tokens_per_s"] = point.global_batch * point.model.seq_len / timing.median_s
    out["loss_first"], out["loss_last"] = float(losses[0]), float(losses[-1])
    if step["xla_flops_per_step"]:
        out["xla_over_model_flops"], note = flops_ratio(point, step["xla_flops_per_step"],
                                                        step["custom_call_flops_per_step"])
        out["flops_note"] = "; ".join(filter(None, [step["flops_note"], note])) or None
    state.clear()  # the donated buffers go before the next point allocates its own
    batches.clear()
    del params, opt_state
    return out


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
        peak = PeakInfo(tflops=peak_tflops, dtype=dtype, source="given", reference="profile_step(peak_tflops=)",
                                hbm_gbytes_per_s=None, interconnect_gbytes_per_s=None, interconnect="unknown",
                                memory_bytes=None, precision="given by the caller")
    else:
        peak = resolve_peak(dtype)
    try:
        memory = compiled.memory_analysis()
    except Exception:
        memory = None
    return describe_step(timing=timing, compile_s=compile_s, cost=cost_dict(compiled), memory=memory,
                         hlo_text=compiled.as_text() or "", devices=used, peak=peak, model_flops=model_flops,
                         mesh=mesh)


# ------------------------------------------------------------- planned rows


def plan_point(point: Point, profile: Profile, target: Target,
               efficiency: roofline.Efficiency | None = None) -> dict:
    """Compile one point for its slice of the target and predict its step; failures come back as rows.

    ``efficiency``: η_c and η_m of the prediction (default: roofline.default_efficiency of the chip).
    """
    return planned_row(point, profile, target, efficiency)[0]


def planned_row(point: Point, profile: Profile, target: Target, efficiency: roofline.Efficiency | None):
    """(row, prediction.ProgramFigures or None) of one point compiled for a target: the figures let a
    calibration predict the row again at other efficiencies."""
    run = profile.run
    slice_name = target.slice_for(point.n_devices)
    devices = target.devices_for(point.n_devices)
    kind = devices[0].device_kind
    n_hosts = len({d.process_index for d in slice_devices(slice_name)})
    row = base_row(point, profile, runtime_columns(target, kind, n_hosts))
    row.update(row_source=f"planned:{target.name}", topology=slice_name, status="planned",
               hosts=";".join(f"p{p}" for p in sorted({d.process_index for d in devices})))
    peak = spec_peak(kind, target.platform, run.dtype)
    hbm = peak.memory_bytes if peak else None
    row["device_memory_bytes"] = hbm
    if peak:
        row.update(peak_tflops_per_device=peak.tflops, peak_dtype=peak.dtype, peak_precision=peak.precision,
                   peak_source=peak.source, peak_reference=peak.reference)
    try:
        program, _, compile_s, cost, memory, text = compile_step(build_step(point, run, devices), run)
    except Exception as exc:  # the compilers report what does not fit as RESOURCE_EXHAUSTED
        message = error_text(exc)
        row.update(status="over_budget" if "RESOURCE_EXHAUSTED" in message else "compile_error", error=message)
        return row, None
    row.update(_program_columns(program, compile_s), **compiled_memory(memory))
    budget = int(hbm * run.max_memory_fraction) if hbm else None
    total = row.get("compiled_total_bytes")
    if budget is not None and total is not None and total > budget:
        row.update(status="over_budget", error=f"compiled step needs {total} bytes per chip, over "
                                               f"{run.max_memory_fraction} of the {hbm} bytes of HBM")
    torus = tuple(int(x) for x in slice_name.split(":")[1].split("x")) if target.platform == "tpu" else None
    comm = predict_comm(text, program.mesh, peak, torus)
    row.update(**comm.collectives.columns(), **comm.axis_columns())
    efficiency = efficiency or roofline.default_efficiency(kind)
    figures = program_figures(text, comm, peak.tflops if peak else None, peak.hbm_gbytes_per_s if peak else None,
                              point.n_devices, row["model_flops_per_step"], efficiency)
    row.update(figures.columns)
    notes = [figures.note, comm.note]
    if row.get("xla_flops_per_step"):
        row["xla_over_model_flops"], note = flops_ratio(point, row["xla_flops_per_step"],
                                                        row.get("custom_call_flops_per_step"))
        notes.append(note)
    if peak and peak.tflops is None:
        notes.append(peak.note)
    local = peak.local_link if peak else None
    row["comm_bandwidth_gbytes_per_s"] = local.gbytes_per_s if local else None
    row["comm_bandwidth_source"] = f"{local.name}: {local.source}" if local and local.gbytes_per_s else None
    row["flops_note"] = "; ".join(filter(None, notes)) or None
    if after_point is not None:
        after_point(row)
    return row, figures
