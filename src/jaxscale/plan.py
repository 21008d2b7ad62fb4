"""A grid → planned rows for a TPU slice or a GPU cluster, and the roofline calibrated on measured steps.

Each point is compiled for the target and predicted on runtimes.CompileOnly
(rows from measure.planned_row). Nothing runs and nothing is allocated: each point is traced from abstract
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

from jaxscale import chips, roofline
from jaxscale.config import Profile, ProfileError, build_profile
from jaxscale.grid import Point, build_grid, grid_size
from jaxscale.records import SCHEMA_VERSION, append_rows, point_key, read_rows
from jaxscale.runtimes import CompileOnly
from jaxscale.startup import StopFlag
from jaxscale.targets import Target, TargetError, cuda_plugin_version, slice_devices


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
    """What a plan wrote: its rows, its folder, the points left out of the grid with their reasons, and whether
    Ctrl-C stopped it early."""

    rows: pd.DataFrame
    report_dir: Path
    dropped: collections.Counter
    interrupted: bool = False  # Ctrl-C stopped it before its last point

    @property
    def failed(self) -> pd.DataFrame:
        """Points that did not compile (over_budget is an answer, not a failure)."""
        return self.rows[self.rows["status"] == "compile_error"]

    @property
    def fittable(self) -> bool:
        """At least two planned points: something to fit."""
        return int((self.rows["status"] == "planned").sum()) >= 2


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

    A first Ctrl-C (startup.StopFlag) stops the plan after the point it is compiling
    (``PlanResult.interrupted``); a second raises KeyboardInterrupt.
    """
    points, dropped = plan_grid(profile, target)
    for n in sorted({p.n_devices for p in points}):
        try:
            target.devices_for(n)
        except TargetError as e:
            raise ProfileError(f"{profile.source}: [mesh] devices: {e}") from None
    with StopFlag() as flag:
        return _plan_points(profile, target, report_dir, points, dropped, on_point, on_row, calibrate, flag)


def _plan_points(profile, target, report_dir, points, dropped, on_point, on_row, calibrate, flag) -> PlanResult:
    kind = slice_devices(target.name)[0].device_kind
    measured = measured_steps(calibrate, kind) if calibrate is not None else None
    runtime = CompileOnly(profile, target)
    early = {}
    if measured is not None:
        by_key = {point_key(r): r for r in measured.to_dict("records")}
        samples = []
        for i, point in enumerate(points):
            key = point_key({**point.grid_columns(), "dtype": profile.run.dtype,
                             "attention": profile.run.attention, "scan_layers": profile.run.scan_layers})
            if key not in by_key:
                continue
            if flag.stop:  # no row is written before the calibration ends: nothing to keep
                raise KeyboardInterrupt
            if on_point:
                on_point(point, i, len(points))
            early[i] = runtime.measure(point, i, None)
            peak, chip = early[i].get("peak_tflops_per_device"), chips.chip_for_kind(kind)
            figures = runtime.figures[i]
            if figures is not None and peak and chip:
                samples.append(roofline.Sample.of_schedule(figures.schedule, peak * 1e12,
                                                           chip.hbm_gbytes_per_s * 1e9,
                                                           float(by_key[key]["step_time_s"])))
        if not samples:
            samples = [s for s in (_row_sample(r) for r in measured.to_dict("records")) if s is not None]
        if not samples:
            raise ProfileError(f"--calibrate {calibrate}: no planned point matches a measured {kind} step there, "
                               "and its rows carry no predicted terms to fit; plan the points that were measured")
        runtime.efficiency = roofline.fit_efficiency(samples, f"calibrated on {len(samples)} measured step"
                                                              f"{'s' if len(samples) > 1 else ''} in {calibrate}")
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "profile.toml").write_text(profile.to_toml())
    (report_dir / "runtime.json").write_text(json.dumps({
        **runtime.columns,
        "cuda_plugin_version": cuda_plugin_version() if target.platform == "gpu" else None,
        "row_source": f"planned:{target.name}", "topology": target.name,
        "slices": {str(n): target.slice_for(n) for n in sorted({p.n_devices for p in points})},
        "planned_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "calibrated_from": str(calibrate) if calibrate is not None else None,
        "schema_version": SCHEMA_VERSION}, indent=1))

    def row_of(point: Point, i: int) -> dict:
        if i in early:
            return _repredict(early[i], runtime.figures[i], runtime.efficiency)
        return runtime.measure(point, i, None)

    csv_path = report_dir / "runs.csv"
    def on_later_point(point: Point, i: int, total: int) -> None:  # the calibration's points were announced
        if on_point and i not in early:
            on_point(point, i, total)

    interrupted = append_rows(points, row_of, csv_path, on_point=on_later_point, on_row=on_row,
                              should_stop=lambda i: runtime.should_stop(i, flag.stopped()))
    return PlanResult(rows=read_rows(csv_path), report_dir=report_dir, dropped=dropped, interrupted=interrupted)
