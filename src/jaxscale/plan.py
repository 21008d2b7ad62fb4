"""Plan a sweep for a TPU slice or a GPU cluster: compile every point for the target, predict its step.

Nothing runs and nothing is allocated: each point is traced from abstract
shapes (step.build_step) and compiled by the TPU compiler for the slice a user
would rent for its chip count (targets.Target; GPU clusters likewise). Its row has the runs.csv
schema with ``row_source = planned:<target>``, the slice it compiled for in
``topology``, and status ``planned`` (compiled
and within the chip's HBM), ``over_budget`` (the compiler found it does not fit,
or its compiled bytes exceed ``max_memory_fraction`` of the HBM) or
``compile_error``. Measured-only columns (step times, runtime peak memory) stay
empty.

The predicted step time is a stated model, each term a column:

    predicted_compute_s = matmul FLOPs per chip / peak FLOP/s of the chip (the math mode of the run)
    predicted_memory_s  = bytes accessed per chip / HBM bandwidth
    predicted_comm_s    = ring traffic per chip of every collective / the link of the mesh axis it runs on
    predicted_step_time_s = max(predicted_compute_s, predicted_memory_s) + predicted_comm_s

Compute and memory overlap (a roofline: the slower one bounds the step);
communication is charged in full, as if none of it hid behind compute, so the
prediction is an upper bound where XLA overlaps collectives with matmuls (the
TPU's collective matmuls do). ``predicted_mfu`` is model FLOPs over
(predicted step time × chips × peak).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Callable

import pandas as pd

from jaxscale import devices as devinfo
from jaxscale import flops
from jaxscale.config import Profile, ProfileError
from jaxscale.grid import Point, build_grid
from jaxscale.records import SCHEMA_VERSION, RowWriter, read_rows
from jaxscale.targets import Target, TargetError, cuda_plugin_version, libtpu_version, slice_devices


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The terms of a predicted step, seconds; None where a figure is missing."""

    compute_s: float | None
    memory_s: float | None
    comm_s: float | None
    step_time_s: float | None
    mfu: float | None

    def columns(self) -> dict:
        return {"predicted_compute_s": self.compute_s, "predicted_memory_s": self.memory_s,
                "predicted_comm_s": self.comm_s, "predicted_step_time_s": self.step_time_s,
                "predicted_mfu": self.mfu}


def predict_step(flops_per_chip: float | None, bytes_per_chip: float | None, comm_s: float | None,
                 peak_tflops: float | None, hbm_gbytes_per_s: float | None, model_flops: float | None,
                 n_chips: int) -> Prediction:
    """The stated step-time model (module docstring); pure arithmetic.

    Args:
      flops_per_chip: matmul (or XLA) FLOPs one chip executes per step.
      bytes_per_chip: bytes one chip reads and writes in HBM per step.
      comm_s: predicted communication seconds per step.
      peak_tflops, hbm_gbytes_per_s: the chip's peak and memory bandwidth.
      model_flops: analytic model FLOPs per step over all chips (for MFU).
      n_chips: chips of the mesh.
    """
    compute = flops_per_chip / (peak_tflops * 1e12) if flops_per_chip and peak_tflops else None
    memory = bytes_per_chip / (hbm_gbytes_per_s * 1e9) if bytes_per_chip and hbm_gbytes_per_s else None
    bound = max((t for t in (compute, memory) if t is not None), default=None)
    step = bound + comm_s if bound is not None and comm_s is not None else None
    mfu = model_flops / (step * n_chips * peak_tflops * 1e12) if step and model_flops and peak_tflops else None
    return Prediction(compute, memory, comm_s, step, mfu)


def _runtime_columns(target: Target, device_kind: str, n_processes: int) -> dict:
    import flax
    import jax
    import jaxlib

    return {"backend": target.platform, "device_kind": device_kind, "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "flax_version": flax.__version__,
            "libtpu_version": libtpu_version() if target.platform == "tpu" else None, "n_processes": n_processes}


def _short(exc: BaseException, limit: int = 600) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()[:limit]


def plan_point(point: Point, profile: Profile, target: Target) -> dict:
    """Compile one point for its slice of the target and predict its step; failures come back as rows."""
    from jaxscale import hlo, sweep
    from jaxscale.measure import compiled_memory, predict_comm
    from jaxscale.step import build_step, compile_program

    run, m = profile.run, point.model
    slice_name = target.slice_for(point.n_devices)
    devices = target.devices_for(point.n_devices)
    kind = devices[0].device_kind
    n_hosts = len({d.process_index for d in slice_devices(slice_name)})
    row = sweep.base_row(point, profile, _runtime_columns(target, kind, n_hosts))
    row.update(row_source=f"planned:{target.name}", topology=slice_name, status="planned",
               hosts=";".join(f"p{p}" for p in sorted({d.process_index for d in devices})))
    peak = devinfo.spec_peak(kind, target.platform, run.dtype)
    hbm = peak.memory_bytes if peak else None
    row["device_memory_bytes"] = hbm
    if peak:
        row.update(peak_tflops_per_device=peak.tflops, peak_dtype=peak.dtype, peak_precision=peak.precision,
                   peak_source=peak.source, peak_reference=peak.reference)
    try:
        program = build_step(point, run, devices)
        _, compile_s, cost, memory, text = compile_program(program)
    except Exception as exc:  # the compilers report what does not fit as RESOURCE_EXHAUSTED
        message = _short(exc)
        row.update(status="over_budget" if "RESOURCE_EXHAUSTED" in message else "compile_error", error=message)
        return row
    row.update(compile_s=compile_s, params=program.params, param_bytes=program.param_bytes,
               opt_state_bytes=program.opt_state_bytes, **compiled_memory(memory))
    budget = int(hbm * run.max_memory_fraction) if hbm else None
    total = row.get("compiled_total_bytes")
    if budget is not None and total is not None and total > budget:
        row.update(status="over_budget", error=f"compiled step needs {total} bytes per chip, over "
                                               f"{run.max_memory_fraction} of the {hbm} bytes of HBM")
    n = point.n_devices
    matmul = hlo.total_matmul_flops(text)
    per_chip_flops = cost.get("flops")  # deviceless GPU compiles have no cost analysis: the HLO's matmuls stand in
    row["xla_flops_per_step"] = per_chip_flops * n if per_chip_flops else None
    bytes_accessed = cost.get("bytes accessed")
    row["xla_bytes_accessed_per_device"] = bytes_accessed
    recompute = point.remat == "full"
    analytic = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                                 recompute=recompute, causal=False)
    notes = []
    if per_chip_flops:
        ratio = per_chip_flops * n / analytic
        row["xla_over_model_flops"] = ratio
        if not 0.95 <= ratio <= 1.25:
            notes.append(f"XLA counts {ratio:.2f}x the analytic FLOPs with full attention"
                         f"{' and recompute' if recompute else ''}")
    comm = predict_comm(text, program.mesh, peak)
    row.update(**comm.collectives.columns(), **comm.axis_columns())
    if comm.note:
        notes.append(comm.note)
    if peak and peak.tflops and bytes_accessed and per_chip_flops:
        row["arithmetic_intensity"] = per_chip_flops / bytes_accessed
        row["ridge_point"] = peak.tflops * 1e12 / (peak.hbm_gbytes_per_s * 1e9)
        row["bound"] = "compute" if row["arithmetic_intensity"] >= row["ridge_point"] else "memory"
    if peak and peak.tflops is None:
        notes.append(peak.note)
    if "xla_flops_one_trip" in cost and cost["xla_flops_one_trip"] is None:  # no cost analysis (deviceless GPU)
        notes.append("the compiler gave no cost analysis for this target: FLOPs are the HLO's matmuls and "
                     "predicted_memory_s is left empty")
    local = peak.local_link if peak else None
    row["comm_bandwidth_gbytes_per_s"] = local.gbytes_per_s if local else None
    row["comm_bandwidth_source"] = f"{local.name}: {local.source}" if local and local.gbytes_per_s else None
    prediction = predict_step(matmul or per_chip_flops, bytes_accessed, comm.seconds,
                              peak.tflops if peak else None, peak.hbm_gbytes_per_s if peak else None,
                              row["model_flops_per_step"], n)
    row.update(prediction.columns())
    row["flops_note"] = "; ".join(filter(None, notes)) or None
    return row


@dataclasses.dataclass(frozen=True)
class PlanResult:
    rows: pd.DataFrame
    report_dir: Path
    dropped: collections.Counter


def plan_grid(profile: Profile, target: Target) -> tuple[list[Point], collections.Counter]:
    """The profile's points whose chip count the target can hold (a slice of one generation)."""
    too_many = [n for n in profile.mesh.devices if n > target.n_chips]
    if too_many == list(profile.mesh.devices):
        raise ProfileError(f"{profile.source}: [mesh] devices = {list(profile.mesh.devices)}: every count exceeds "
                           f"the {target.n_chips} chips of {target.name}; plan a larger topology or smaller counts")
    points, dropped = build_grid(profile, target.n_chips, 1) if not too_many else _grid_within(profile, target)
    for n in too_many:
        dropped[f"{n} chips exceed the {target.n_chips} of {target.name}"] += 1
    return points, dropped


def _grid_within(profile: Profile, target: Target):
    raw = {**profile.raw, "mesh": {**profile.raw["mesh"],
                                   "devices": [n for n in profile.mesh.devices if n <= target.n_chips]}}
    from jaxscale.config import build_profile

    return build_grid(build_profile(raw, profile.source), target.n_chips, 1)


def run_plan(profile: Profile, target: Target, report_dir: Path,
             on_point: Callable[[Point, int, int], None] | None = None,
             on_row: Callable[[dict], None] | None = None) -> PlanResult:
    """Plan every point of a profile for a target and write report_dir/runs.csv (appended row by row)."""
    points, dropped = plan_grid(profile, target)
    for n in sorted({p.n_devices for p in points}):
        try:
            target.devices_for(n)
        except TargetError as e:
            raise ProfileError(f"{profile.source}: [mesh] devices: {e}") from None
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "profile.toml").write_text(profile.to_toml())
    first = slice_devices(target.name)[0]
    (report_dir / "runtime.json").write_text(json.dumps({
        **_runtime_columns(target, first.device_kind, len({d.process_index for d in slice_devices(target.name)})),
        "cuda_plugin_version": cuda_plugin_version() if target.platform == "gpu" else None,
        "row_source": f"planned:{target.name}", "topology": target.name,
        "slices": {str(n): target.slice_for(n) for n in sorted({p.n_devices for p in points})},
        "planned_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "schema_version": SCHEMA_VERSION}, indent=1))
    csv_path = report_dir / "runs.csv"
    with RowWriter(csv_path) as writer:
        for i, point in enumerate(points):
            if on_point:
                on_point(point, i, len(points))
            row = plan_point(point, profile, target)
            writer.append(row)
            if on_row:
                on_row(row)
    return PlanResult(rows=read_rows(csv_path), report_dir=report_dir, dropped=dropped)
