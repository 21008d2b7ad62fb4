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

The predicted step time is the per-op roofline of roofline.py, each term a column:

    t_i                   = max(flops_i / (η_c·peak), hbm_bytes_i / (η_m·HBM bandwidth)) per scheduled kernel
    predicted_roofline_s  = Σ t_i over the kernels, loop trips counted
    predicted_comm_s      = every collective's ring traffic over the link of the mesh axes it spans
    predicted_exposed_comm_s = what communication adds to the roofline: synchronous collectives
                            in full, async ones only for what outlasts the kernels between start and done
    predicted_step_time_s = predicted_roofline_s + predicted_exposed_comm_s

``predicted_mfu`` is model FLOPs over (predicted step time × chips × peak).
η_c and η_m are the part's measured practical fractions where jaxscale has
them (chips.PRACTICAL), else 1; ``run_plan(..., calibrate=RUN_DIR)`` fits them
to the measured steps of the same chip instead (``roofline_efficiency`` says which).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import math
from pathlib import Path
from typing import Callable

import pandas as pd

from jaxscale import devices as devinfo
from jaxscale import chips, flops, roofline
from jaxscale.config import Profile, ProfileError
from jaxscale.grid import Point, build_grid, grid_size
from jaxscale.records import SCHEMA_VERSION, RowWriter, error_text, read_rows
from jaxscale.targets import (Target, TargetError, cuda_plugin_version, libtpu_version,
                              slice_devices)


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The headline terms of a predicted step, seconds; None where a figure is missing."""

    compute_s: float | None
    memory_s: float | None
    comm_s: float | None
    step_time_s: float | None
    mfu: float | None

    def columns(self) -> dict:
        return {"predicted_compute_s": self.compute_s, "predicted_memory_s": self.memory_s,
                "predicted_comm_s": self.comm_s, "predicted_step_time_s": self.step_time_s,
                "predicted_mfu": self.mfu}


def predict_step(schedule: roofline.Schedule, peak_tflops: float, hbm_gbytes_per_s: float,
                 model_flops: float | None, n_chips: int,
                 efficiency: roofline.Efficiency = roofline.Efficiency()) -> Prediction:
    """The roofline model's step for a compiled program's schedule (roofline.Schedule.from_hlo).

    Args:
      schedule: the program's kernels and collectives in schedule order.
      peak_tflops, hbm_gbytes_per_s: the chip's peak and memory bandwidth.
      model_flops: analytic model FLOPs per step over all chips (for MFU).
      n_chips: chips of the mesh.
      efficiency: η_c and η_m.
    """
    t = schedule.predict(peak_tflops * 1e12, hbm_gbytes_per_s * 1e9, efficiency)
    mfu = model_flops / (t.step_s * n_chips * peak_tflops * 1e12) if t.step_s and model_flops else None
    return Prediction(t.compute_s, t.memory_s, t.comm_s, t.step_s, mfu)


def _runtime_columns(target: Target, device_kind: str, n_processes: int) -> dict:
    import flax
    import jax
    import jaxlib

    return {"backend": target.platform, "device_kind": device_kind, "jax_version": jax.__version__,
            "jaxlib_version": jaxlib.__version__, "flax_version": flax.__version__,
            "libtpu_version": libtpu_version() if target.platform == "tpu" else None, "n_processes": n_processes}


def plan_point(point: Point, profile: Profile, target: Target,
               efficiency: roofline.Efficiency | None = None) -> dict:
    """Compile one point for its slice of the target and predict its step; failures come back as rows.

    ``efficiency``: η_c and η_m of the prediction (default: roofline.default_efficiency of the chip).
    """
    return _plan_point(point, profile, target, efficiency)[0]


def _plan_point(point: Point, profile: Profile, target: Target, efficiency: roofline.Efficiency | None):
    """(row, ProgramFigures or None) of one point."""
    from jaxscale import sweep
    from jaxscale.measure import compiled_memory, predict_comm, program_figures
    from jaxscale.step import build_step, compile_step

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
        program, _, compile_s, cost, memory, text = compile_step(build_step(point, run, devices), run)
    except Exception as exc:  # the compilers report what does not fit as RESOURCE_EXHAUSTED
        message = error_text(exc)
        row.update(status="over_budget" if "RESOURCE_EXHAUSTED" in message else "compile_error", error=message)
        return row, None
    row.update(attention_impl=program.attention.impl, attention_note=program.attention.note,
               compile_s=compile_s, params=program.params, param_bytes=program.param_bytes,
               opt_state_bytes=program.opt_state_bytes, **compiled_memory(memory))
    budget = int(hbm * run.max_memory_fraction) if hbm else None
    total = row.get("compiled_total_bytes")
    if budget is not None and total is not None and total > budget:
        row.update(status="over_budget", error=f"compiled step needs {total} bytes per chip, over "
                                               f"{run.max_memory_fraction} of the {hbm} bytes of HBM")
    n = point.n_devices
    torus = tuple(int(x) for x in slice_name.split(":")[1].split("x")) if target.platform == "tpu" else None
    comm = predict_comm(text, program.mesh, peak, torus)
    row.update(**comm.collectives.columns(), **comm.axis_columns())
    efficiency = efficiency or roofline.default_efficiency(kind)
    figures = program_figures(text, comm, peak.tflops if peak else None, peak.hbm_gbytes_per_s if peak else None,
                              n, row["model_flops_per_step"], efficiency)
    row.update(figures.columns)
    notes = [figures.note, comm.note]
    recompute = point.remat == "full"
    analytic = flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch, m.d_ff,
                                 recompute=recompute, causal=False)
    xla = row.get("xla_flops_per_step")
    if xla:
        if row.get("custom_call_flops_per_step"):  # fused attention computes the causal half, not the square
            analytic -= (analytic - flops.train_flops(m.d_model, m.n_layers, m.seq_len, m.vocab, point.global_batch,
                                                      m.d_ff, recompute=recompute, causal=True))
        ratio = xla / analytic
        row["xla_over_model_flops"] = ratio
        if not 0.95 <= ratio <= 1.25:
            notes.append(f"the HLO counts {ratio:.2f}x the analytic FLOPs"
                         f"{' with recompute' if recompute else ''}")
    if peak and peak.tflops is None:
        notes.append(peak.note)
    local = peak.local_link if peak else None
    row["comm_bandwidth_gbytes_per_s"] = local.gbytes_per_s if local else None
    row["comm_bandwidth_source"] = f"{local.name}: {local.source}" if local and local.gbytes_per_s else None
    row["flops_note"] = "; ".join(filter(None, notes)) or None
    return row, figures


def _repredict(row: dict, figures, efficiency: roofline.Efficiency) -> dict:
    """A planned row's predicted columns at other efficiencies (its program's schedule walked again)."""
    peak, bw = row.get("peak_tflops_per_device"), None
    chip = chips.chip_for_kind(str(row.get("device_kind") or ""))
    bw = chip.hbm_gbytes_per_s if chip else None
    if figures is None or not peak or not bw or "predicted_step_time_s" not in figures.columns:
        return row
    t = figures.schedule.predict(peak * 1e12, bw * 1e9, efficiency)
    row = {**row, **t.columns(), "bound": t.bound, "roofline_eta_compute": efficiency.compute,
           "roofline_eta_memory": efficiency.memory, "roofline_efficiency": efficiency.source}
    model = row.get("model_flops_per_step")
    row["predicted_mfu"] = model / (t.step_s * row["n_devices"] * peak * 1e12) if model and t.step_s else None
    return row


# Columns that say which point a row is: a planned point calibrates against a measured row with the same values.
_POINT_KEY = ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab", "strategy", "n_devices", "global_batch",
              "dtype", "remat", "attention", "scan_layers")


def _key(values: dict) -> tuple:
    out = []
    for c in _POINT_KEY:
        v = values.get(c)
        if isinstance(v, float) and v == int(v):
            v = int(v)
        out.append(str(v).lower())
    return tuple(out)


def measured_steps(run_dir: Path, device_kind: str) -> pd.DataFrame:
    """The measured rows of one chip in a run folder (or runs.csv), for a calibration; ProfileError when none."""
    path = Path(run_dir)
    csv = path / "runs.csv" if path.is_dir() else path
    if not csv.is_file():
        raise ProfileError(f"--calibrate {run_dir}: no runs.csv there; give a report folder of `jaxscale run`")
    rows = read_rows(csv)
    ok = rows[(rows["status"] == "ok") & rows["step_time_s"].notna()] if "step_time_s" in rows else rows.iloc[:0]
    ok = ok[ok["row_source"].astype(str) == "measured"] if "row_source" in ok else ok
    mine = ok[ok["device_kind"].astype(str).str.lower() == device_kind.lower()]
    if mine.empty:
        kinds = sorted(set(ok["device_kind"].astype(str))) if len(ok) else []
        raise ProfileError(f"--calibrate {run_dir}: no measured step of a {device_kind} there"
                           + (f" (it has {', '.join(kinds)})" if kinds else "")
                           + "; calibrate from a run on the chip the plan targets")
    return mine


def _row_sample(r) -> roofline.Sample | None:
    """A calibration sample from a measured row's own predicted terms (rows measured by this version)."""
    cols = ("predicted_compute_bound_s", "predicted_memory_bound_s", "predicted_exposed_comm_s",
            "roofline_eta_compute", "roofline_eta_memory")
    if any(c not in r or r[c] is None or (isinstance(r[c], float) and math.isnan(r[c])) for c in cols):
        return None
    used = roofline.Efficiency(float(r["roofline_eta_compute"]), float(r["roofline_eta_memory"]))
    return roofline.Sample.of_terms(float(r["predicted_compute_bound_s"]), float(r["predicted_memory_bound_s"]),
                                    float(r["predicted_exposed_comm_s"]), used, float(r["step_time_s"]))


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
    for n in too_many:  # every point at that count: sizes x strategies x batches x remat policies x flag sets
        dropped[f"{n} chips exceed the {target.n_chips} of {target.name}"] += grid_size(profile, (n,))
    return points, dropped


def _grid_within(profile: Profile, target: Target):
    raw = {**profile.raw, "mesh": {**profile.raw["mesh"],
                                   "devices": [n for n in profile.mesh.devices if n <= target.n_chips]}}
    from jaxscale.config import build_profile

    return build_grid(build_profile(raw, profile.source), target.n_chips, 1)


def run_plan(profile: Profile, target: Target, report_dir: Path,
             on_point: Callable[[Point, int, int], None] | None = None,
             on_row: Callable[[dict], None] | None = None, calibrate: Path | None = None) -> PlanResult:
    """Plan every point of a profile for a target and write report_dir/runs.csv (appended row by row).

    ``calibrate``: a run folder (or runs.csv) of measured steps on the target's chip.
    Planned points that match a measured row (same model, strategy, devices, batch,
    dtype, remat, attention, layer form) are compiled first; η_c and η_m are fitted so
    their predicted steps match the measured ones (roofline.fit_efficiency), and every
    row is predicted with them. Without matching points, measured rows that carry
    their own predicted terms (runs of this version) are fitted instead.
    """
    points, dropped = plan_grid(profile, target)
    for n in sorted({p.n_devices for p in points}):
        try:
            target.devices_for(n)
        except TargetError as e:
            raise ProfileError(f"{profile.source}: [mesh] devices: {e}") from None
    kind = slice_devices(target.name)[0].device_kind
    measured = measured_steps(calibrate, kind) if calibrate is not None else None
    efficiency, early = None, {}
    if measured is not None:
        by_key = {_key(r): r for r in measured.to_dict("records")}
        samples = []
        for i, point in enumerate(points):
            row_key = _key({**dataclasses.asdict(point.model), "strategy": point.strategy,
                            "n_devices": point.n_devices, "global_batch": point.global_batch,
                            "dtype": profile.run.dtype, "remat": point.remat, "attention": profile.run.attention,
                            "scan_layers": profile.run.scan_layers})
            if row_key not in by_key:
                continue
            if on_point:
                on_point(point, i, len(points))
            row, figures = _plan_point(point, profile, target, None)
            early[i] = (row, figures)
            r = by_key[row_key]
            peak, chip = row.get("peak_tflops_per_device"), chips.chip_for_kind(kind)
            if figures is not None and peak and chip:
                samples.append(roofline.Sample.of_schedule(figures.schedule, peak * 1e12,
                                                           chip.hbm_gbytes_per_s * 1e9, float(r["step_time_s"])))
        if not samples:
            samples = [s for s in (_row_sample(r) for r in measured.to_dict("records")) if s is not None]
        if not samples:
            raise ProfileError(f"--calibrate {calibrate}: no planned point matches a measured {kind} step there, "
                               "and its rows carry no predicted terms to fit; plan the points that were measured")
        efficiency = roofline.fit_efficiency(samples, f"calibrated on {len(samples)} measured step"
                                                      f"{'s' if len(samples) > 1 else ''} in {calibrate}")
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "profile.toml").write_text(profile.to_toml())
    first = slice_devices(target.name)[0]
    (report_dir / "runtime.json").write_text(json.dumps({
        **_runtime_columns(target, first.device_kind, len({d.process_index for d in slice_devices(target.name)})),
        "cuda_plugin_version": cuda_plugin_version() if target.platform == "gpu" else None,
        "row_source": f"planned:{target.name}", "topology": target.name,
        "slices": {str(n): target.slice_for(n) for n in sorted({p.n_devices for p in points})},
        "planned_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "calibrated_from": str(calibrate) if calibrate is not None else None,
        "schema_version": SCHEMA_VERSION}, indent=1))
    csv_path = report_dir / "runs.csv"
    with RowWriter(csv_path) as writer:
        for i, point in enumerate(points):
            if i in early:
                row = _repredict(*early[i], efficiency)
            else:
                if on_point:
                    on_point(point, i, len(points))
                row = plan_point(point, profile, target, efficiency)
            writer.append(row)
            if on_row:
                on_row(row)
    return PlanResult(rows=read_rows(csv_path), report_dir=report_dir, dropped=dropped)
