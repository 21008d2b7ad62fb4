"""A profile's grid → measured rows: the runtime its points run on, the loop that records them, resuming.

Each point becomes a row in measure.py, on the runtime chosen for the profile
(runtimes.InProcess or workers.WorkerRuntime); a point that fails is a row
with a failure status and the sweep goes on. Rows are appended durably as they
finish (records.append_rows), so an interrupted sweep can be resumed from its
report folder without redoing or duplicating a point.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import jax
import pandas as pd

from jaxscale.config import Profile, ProfileError, load_profile
from jaxscale.distributed import init_distributed
from jaxscale.grid import Point, build_grid, matches, parse_selector
from jaxscale.folders import ReportDir
from jaxscale.records import RowWriter, append_rows, read_rows, row_key
from jaxscale.runtimes import InProcess
from jaxscale.startup import StopFlag, choose_isolation
from jaxscale.targets import toolchain_versions
from jaxscale.workers import WorkerRuntime


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What a sweep did.

    Attributes:
      rows: every row of the report's runs.csv (earlier runs included on resume).
      report_dir: the report folder (None on processes other than 0).
      dropped: reasons points were left out of the grid, with counts.
      skipped: points already recorded and not rerun (resume).
      interrupted: True when Ctrl-C stopped the sweep early.
    """

    rows: pd.DataFrame
    report_dir: Path | None
    dropped: collections.Counter
    skipped: int
    interrupted: bool

    @property
    def failed(self) -> pd.DataFrame:
        return self.rows[self.rows["status"] != "ok"] if len(self.rows) else self.rows


def check_trace(selector_text: str, points: list[Point]) -> None:
    """A --trace selector must match some point; else a ProfileError says what the points' values are."""
    selector = parse_selector(selector_text)
    if any(matches(p, selector) for p in points):
        return
    values = []
    for key in selector:
        seen = sorted({str(p.grid_columns()[key]) for p in points}, key=lambda v: (len(v), v))
        values.append(f"{key}: {', '.join(seen)}")
    raise ProfileError(f"--trace {selector_text!r} matches none of the {len(points)} points (their "
                       f"{'; '.join(values)})")


def check_recorded_points(resume: Path | str, profile: Profile, points: list[Point], recorded) -> None:
    """Without a profile.toml to go by, the rows already in the folder must be points of this profile's grid."""
    if recorded is None or not len(recorded) or (Path(resume) / "profile.toml").is_file():
        return
    keys = {p.key for p in points}
    foreign = 0
    for _, r in recorded.iterrows():
        try:
            foreign += row_key(r) not in keys
        except (KeyError, ValueError, TypeError):
            foreign += 1
    if foreign:
        raise ProfileError(f"--resume {resume}: {foreign} of its {len(recorded)} rows are points that "
                           f"{profile.source} does not define; give the profile (and --set options) that "
                           "recorded them")


def open_runtime(profile: Profile, dist=None, compile_cache: bool = True):
    """Where the points of a profile run: runtimes.InProcess, or a workers.WorkerRuntime (startup.choose_isolation).

    On several hosts (``dist.wanted``), an in-process runtime joins jax.distributed
    here (distributed.init_distributed); worker owners join their own session.

    Raises:
      distributed.SetupError: no session to join, or no worker to probe the devices.
    """
    if choose_isolation(profile.run) == "process":
        return WorkerRuntime(profile, dist=dist, compile_cache=compile_cache)
    if dist is not None and dist.wanted:
        init_distributed(dist)
    return InProcess(profile)


def grid_for(profile: Profile, runtime=None) -> tuple[list[Point], collections.Counter]:
    """The grid of a profile for a runtime's devices and processes (default: this process's JAX runtime)."""
    if runtime is None:
        return build_grid(profile, jax.device_count(), jax.process_count())
    return build_grid(profile, runtime.device_count, runtime.process_count)


def checked_grid(profile: Profile, runtime, trace: str | None = None, resume: Path | str | None = None,
                 recorded: pd.DataFrame | None = None) -> tuple[list[Point], collections.Counter]:
    """grid_for, refusing before any point runs a ``trace`` selector that matches no point and (process 0,
    resuming a folder without profile.toml) ``recorded`` rows that are not points of this grid.

    Raises:
      ProfileError: either of those.
    """
    points, dropped = grid_for(profile, runtime)
    if trace:
        check_trace(trace, points)
    if resume and runtime.lead:
        check_recorded_points(resume, profile, points, recorded)
    return points, dropped


def run_profile(
    profile: Profile,
    report_dir: Path,
    *,
    resume: bool = False,
    retry_failed: bool = False,
    trace: str | None = None,
    on_point: Callable[[Point, int, int], None] | None = None,
    on_row: Callable[[dict], None] | None = None,
    runtime=None,
) -> SweepResult:
    """Run every grid point of a profile and append its rows to report_dir/runs.csv.

    Args:
      profile: the validated profile.
      report_dir: the report folder (created by process 0 only).
      resume: skip points already recorded in report_dir/runs.csv.
      retry_failed: with resume, rerun points whose recorded status is not ok.
      trace: a selector on grid columns; matching points are traced with
        jax.profiler into report_dir/traces/.
      on_point: called before each point with (point, index, total) — progress.
      on_row: called with each finished row.
      runtime: where points run (open_runtime); by default chosen from the
        profile's isolation and closed at the end.

    Returns:
      A SweepResult.
    """
    own_runtime = runtime is None
    if own_runtime:
        runtime = open_runtime(profile)
    try:
        return _run_points(profile, report_dir, runtime, resume=resume, retry_failed=retry_failed, trace=trace,
                           on_point=on_point, on_row=on_row)
    finally:
        if own_runtime:
            runtime.close()


def _run_points(profile, report_dir, runtime, *, resume, retry_failed, trace, on_point, on_row) -> SweepResult:
    points, dropped = grid_for(profile, runtime)
    selector = parse_selector(trace) if trace else None
    lead = runtime.lead
    csv_path = report_dir / "runs.csv"
    done: set[tuple] = set()
    if resume and lead and csv_path.exists():
        previous = read_rows(csv_path)
        for _, r in previous.iterrows():
            if retry_failed and r["status"] != "ok":
                continue
            done.add(row_key(r))
        if retry_failed and len(previous):
            _rewrite(csv_path, previous[previous["status"] == "ok"])
    # only process 0 holds the rows: every process skips what it skips
    skip = runtime.broadcast([int(p.key in done) for p in points])
    todo = [p for p, s in zip(points, skip) if not s]
    skipped = len(points) - len(todo)
    if lead:
        report_dir.mkdir(parents=True, exist_ok=True)
        (report_dir / "profile.toml").write_text(profile.to_toml())
        (report_dir / "runtime.json").write_text(json.dumps({**runtime.describe, **runtime.columns,
                                                             **toolchain_versions(runtime.columns.get("backend")),
                                                             "isolation": runtime.isolation,
                                                             "peak": dataclasses.asdict(runtime.peak),
                                                             **runtime.memory.describe(),
                                                             "allocator": runtime.allocator.describe()}, indent=1))
    def trace_dir(point: Point) -> Path | None:
        if not matches(point, selector):
            return None
        return report_dir / "traces" / f"{point.model.size_name}-{point.strategy}-n{point.n_devices}"

    with StopFlag() as flag:
        def should_stop(i: int) -> bool:
            return runtime.should_stop(i, flag.stopped())

        interrupted = append_rows(todo, lambda point, i: runtime.measure(point, i, trace_dir(point)),
                                  csv_path if lead else None, on_point=on_point, on_row=on_row,
                                  should_stop=should_stop)
    rows = read_rows(csv_path) if csv_path.exists() else pd.DataFrame()
    return SweepResult(rows=rows, report_dir=report_dir if lead else None, dropped=dropped, skipped=skipped,
                       interrupted=interrupted)


def _rewrite(path: Path, frame: pd.DataFrame) -> None:
    """Replace runs.csv with the given rows (used by --retry-failed), atomically."""
    tmp = path.with_suffix(".tmp")
    if tmp.exists():
        tmp.unlink()
    with RowWriter(tmp) as writer:
        for _, r in frame.iterrows():
            writer.append({k: ("" if pd.isna(v) else v) for k, v in r.items() if k in set(frame.columns)})
    os.replace(tmp, path)


def run_sweep(profile: str | Profile, out: Path | str | None = None, overrides: tuple[str, ...] = ()) -> pd.DataFrame:
    """Run a profile (a path, a shipped name or a Profile) and return its rows as a DataFrame.

    The notebook entry point: no progress bar, no analysis, rows also written to
    a report folder under ``out`` (default ``reports/``).
    """
    if not isinstance(profile, Profile):
        profile = load_profile(profile, overrides)
    report = ReportDir.for_run(profile.run.name, out)
    try:
        runtime = open_runtime(profile)
        try:
            grid_for(profile, runtime)  # validate against the runtime before anything is written
            result = run_profile(profile, report.path, runtime=runtime)
        finally:
            runtime.close()
    finally:
        report.discard()  # releases it; removes it if nothing was recorded
    return result.rows
