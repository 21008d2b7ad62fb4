"""The rows of runs.csv: their schema, column roles and point key; appending them durably, reading them back.

Each row is appended and fsync'd the moment its point finishes, so a sweep
killed at any instant leaves a file whose complete lines are all valid rows.
A torn last line (the write that was interrupted) is dropped by the reader
with a warning.

Rows carry their run's id (folders.py), so rows of one run given twice can be
told from two runs of the same point (``drop_duplicates``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from jaxscale.config import Profile, ProfileError, load_profile, profile_difference
from jaxscale.folders import check_not_in_use, new_run_id, read_run_id
from jaxscale.grid import KEY_COLUMNS, TEXT_KEY_COLUMNS

# 3: run_id, attention_impl and attention_note, the roofline model's terms and kernels_per_step.
# 2: remat as a policy name, xla_flags, isolation. Older files are read as they are.
SCHEMA_VERSION = 3

COLUMNS: tuple[str, ...] = (
    "schema_version", "run_id", "timestamp_utc", "profile", "row_source", "status", "error",
    # grid point
    "size_name", "strategy", "n_devices", "n_processes", "hosts", "mesh_shape", "d_model", "n_layers", "n_heads", "d_ff",
    "seq_len", "vocab", "global_batch", "batch_mode", "dtype", "remat", "attention", "attention_impl", "attention_note", "scan_layers",
    "xla_flags",
    "isolation",
    # runtime
    "backend", "topology", "device_kind", "jax_version", "jaxlib_version", "flax_version", "libtpu_version",
    # counts and FLOPs
    "params", "tokens_per_step", "model_flops_per_step", "attention_flops", "xla_flops_per_step",
    "xla_over_model_flops", "custom_call_flops_per_step", "flops_note",
    # time
    "compile_s", "warmup_s", "step_time_s", "step_time_p10_s", "step_time_p90_s", "step_time_cv", "step_time_mean_s",
    "n_timed_steps", "step_time_samples_s", "tokens_per_s",
    # predicted (jaxscale plan): a stated model of step time, each term a column
    "predicted_compute_s", "predicted_memory_s", "predicted_step_time_s", "predicted_mfu",
    # the roofline model's terms (roofline.py) and the efficiencies they assume; kernel launches per step
    "predicted_roofline_s", "predicted_compute_bound_s", "predicted_memory_bound_s", "predicted_exposed_comm_s",
    "predicted_overlapped_step_s", "predicted_exposed_step_s", "roofline_eta_compute", "roofline_eta_memory",
    "roofline_efficiency", "kernels_per_step",
    # utilization
    "achieved_tflops_per_device", "peak_tflops_per_device", "peak_dtype", "peak_precision", "peak_source",
    "peak_reference", "mfu", "hfu",
    # memory, per device
    "param_bytes", "opt_state_bytes", "compiled_argument_bytes", "compiled_output_bytes", "compiled_temp_bytes",
    "compiled_alias_bytes", "compiled_total_bytes", "peak_bytes_in_use", "bytes_limit", "device_memory_bytes",
    # communication, per device
    "all_reduce_bytes", "all_reduce_count", "all_gather_bytes", "all_gather_count", "reduce_scatter_bytes",
    "reduce_scatter_count", "all_to_all_bytes", "all_to_all_count", "collective_permute_bytes",
    "collective_permute_count", "collective_traffic_bytes", "predicted_comm_s", "comm_bandwidth_gbytes_per_s",
    "comm_bandwidth_source", "comm_link_data", "comm_link_data_gbytes_per_s", "collective_traffic_data_bytes",
    "predicted_comm_data_s", "comm_link_model", "comm_link_model_gbytes_per_s", "collective_traffic_model_bytes",
    "predicted_comm_model_s",
    # roofline
    "xla_bytes_accessed_per_device", "arithmetic_intensity", "ridge_point", "bound",
    # sanity
    "loss_first", "loss_last", "trace_dir",
)

# Statuses of rows that carry no failure: measured, or compiled for a target (jaxscale plan).
SUCCESS_STATUSES = ("ok", "planned")
# Bytes each kind of collective moves per step, one column each.
COLLECTIVE_COLUMNS = ("all_reduce_bytes", "all_gather_bytes", "reduce_scatter_bytes", "all_to_all_bytes",
                      "collective_permute_bytes")

# ------------------------------------------------------------------ column roles

SIZE_COLUMNS = ("size_name", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab")

# Columns of runs.csv that say how a point was run. Rows that differ in any of
# them never share a fit: each family is split by every one of them that is not
# its x or tied to its x (families.X_LINKED).
CONFIG_COLUMNS = ("row_source", "backend", "device_kind", "n_processes", "jax_version", "jaxlib_version",
                  "flax_version", "libtpu_version", *SIZE_COLUMNS, "params", "strategy", "n_devices", "mesh_shape",
                  "model_axis", "hosts", "batch_mode", "global_batch", "per_device_batch", "tokens_per_step", "dtype",
                  "remat", "attention", "attention_impl", "scan_layers", "xla_flags", "isolation", "attention_flops",
                  "topology")
# Columns of runs.csv that never split a fit: measurements, things derived from
# the config columns, and bookkeeping.
NON_CONFIG_COLUMNS = frozenset({
    "schema_version", "run_id", "timestamp_utc", "profile", "status", "error", "model_flops_per_step", "xla_flops_per_step",
    "xla_over_model_flops", "flops_note", "compile_s", "warmup_s", "step_time_s", "step_time_p10_s",
    "step_time_p90_s", "step_time_cv", "step_time_mean_s", "n_timed_steps", "step_time_samples_s", "tokens_per_s",
    "predicted_compute_s", "predicted_memory_s", "predicted_step_time_s", "predicted_mfu",
    "achieved_tflops_per_device", "peak_tflops_per_device", "peak_dtype", "peak_source", "peak_reference", "mfu",
    "hfu", "param_bytes", "opt_state_bytes", "compiled_argument_bytes", "compiled_output_bytes",
    "compiled_temp_bytes", "compiled_alias_bytes", "compiled_total_bytes", "peak_bytes_in_use", "bytes_limit",
    "device_memory_bytes", *COLLECTIVE_COLUMNS, "all_reduce_count", "all_gather_count", "reduce_scatter_count",
    "all_to_all_count", "collective_permute_count", "collective_traffic_bytes", "predicted_comm_s",
    "comm_bandwidth_gbytes_per_s", "comm_bandwidth_source", "xla_bytes_accessed_per_device",
    "arithmetic_intensity", "ridge_point", "bound", "loss_first", "loss_last", "trace_dir", "peak_precision",
    "custom_call_flops_per_step", "collective_traffic_data_bytes", "collective_traffic_model_bytes",
    "predicted_comm_data_s", "predicted_comm_model_s", "comm_link_data", "comm_link_model",
    "comm_link_data_gbytes_per_s", "comm_link_model_gbytes_per_s", "attention_note",
    "predicted_roofline_s", "predicted_compute_bound_s", "predicted_memory_bound_s", "predicted_exposed_comm_s",
    "predicted_overlapped_step_s", "predicted_exposed_step_s", "roofline_eta_compute", "roofline_eta_memory",
    "roofline_efficiency", "kernels_per_step",
})


def error_text(exc: BaseException, limit: int = 600) -> str:
    """An exception as a row's ``error`` cell: its type and message on one line, cut to ``limit`` characters."""
    return f"{type(exc).__name__}: {exc}".replace("\n", " ").strip()[:limit]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RowWriter:
    """Appends rows to a CSV, header once, each row flushed and fsync'd.

    Every row gets a ``run_id``: its own, else ``run_id`` given here, else the
    id of the report folder the file is in (``run_id.txt``), else one made for
    this writer. A file written under an older schema is first rewritten under
    the current header (atomically; its rows keep every value, and those
    without a run id take this writer's), so appended rows line up with it.
    """

    def __init__(self, path: Path, run_id: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id or read_run_id(self.path.parent) or new_run_id()
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            _truncate_torn_tail(self.path)
            _upgrade_header(self.path, self.run_id)
        self._file = open(self.path, "a", newline="")
        if fresh:
            self._write_line(COLUMNS)

    def _write_line(self, cells) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(cells)
        self._file.write(buf.getvalue())
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, row: dict) -> None:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise KeyError(f"row has columns outside the schema: {sorted(unknown)}")
        if row.get("run_id") in (None, ""):
            row = {**row, "run_id": self.run_id}
        self._write_line([_cell(row.get(c)) for c in COLUMNS])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def append_rows(points: Sequence, row_of: Callable[[Any, int], dict], path: Path | None, *,
                on_point: Callable[[Any, int, int], None] | None = None,
                on_row: Callable[[dict], None] | None = None,
                should_stop: Callable[[int], bool] | None = None) -> bool:
    """Make each point's row and append it to the CSV at ``path`` as it comes: the loop of a sweep and of a plan.

    Args:
      points: the points, in order.
      row_of: ``(point, index) -> row``; a failure is a row, not an exception.
      path: the CSV (RowWriter), or None on a process that records nothing.
      on_point: called before each point with (point, index, total).
      on_row: called with each row once it is written.
      should_stop: called after each point with its index; True stops before the next one.

    Returns:
      True when should_stop ended the loop before its last point.
    """
    writer = RowWriter(path) if path is not None else None
    try:
        for i, point in enumerate(points):
            if on_point:
                on_point(point, i, len(points))
            row = row_of(point, i)
            if writer:
                writer.append(row)
            if on_row:
                on_row(row)
            if should_stop is not None and should_stop(i) and i + 1 < len(points):
                return True
        return False
    finally:
        if writer:
            writer.close()


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a kill, so appended rows start on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)


def _upgrade_header(path: Path, run_id: str) -> None:
    """Rewrite a runs.csv whose header is not COLUMNS (an older schema) under COLUMNS, atomically."""
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if header is None or tuple(header) == COLUMNS:
        return
    unknown = [c for c in header if c not in COLUMNS]
    if unknown:
        raise ValueError(f"{path}: columns {unknown} are not in this version's schema (a newer jaxscale wrote "
                         "it?); append to it with the version that wrote it, or start a new report folder")
    with open(path, newline="") as f:
        records = list(csv.reader(f))[1:]
    tmp = path.with_name(path.name + ".upgrade")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for record in records:
            if len(record) != len(header):
                writer.writerow(record)  # malformed before; the reader still drops it with a warning
                continue
            values = dict(zip(header, record))
            values["run_id"] = values.get("run_id") or run_id
            writer.writerow([values.get(c, "") for c in COLUMNS])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_rows(path: Path | str) -> pd.DataFrame:
    """Read runs.csv rows as strings-then-numbers; a torn last line is dropped with a warning."""
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        warnings.warn(f"{path}: dropped a torn last line (the sweep was interrupted while writing it)")
        lines = lines[:-1]
    if not lines:
        return pd.DataFrame(columns=list(COLUMNS))
    records = list(csv.reader(lines))
    header, body = records[0], records[1:]
    good = [r for r in body if len(r) == len(header)]
    if len(good) != len(body):
        warnings.warn(f"{path}: dropped {len(body) - len(good)} malformed line(s)")
    frame = pd.DataFrame(good, columns=header)
    for column in frame.columns:
        non_empty = frame[column] != ""
        converted = pd.to_numeric(frame[column].where(non_empty), errors="coerce")
        if non_empty.any() and converted[non_empty].notna().all():
            frame[column] = converted
        else:  # an empty cell is a missing value, in text columns too
            frame[column] = frame[column].where(non_empty, None)
    return frame


def row_key(row) -> tuple:
    """The grid key of a row as read back (see grid.Point.key)."""
    out = []
    for column in KEY_COLUMNS:
        value = row[column]
        if column in TEXT_KEY_COLUMNS:
            out.append("" if value is None or (isinstance(value, float) and value != value) else str(value))
        else:
            out.append(int(value))
    return tuple(out)


# The columns that decide a point's program: its grid key and the run settings that change what compiles.
# Labels (size_name, batch_mode) are not part of it: two rows of the same program are the same point.
POINT_KEY = (*KEY_COLUMNS, "dtype", "attention", "scan_layers")
# What a point is called. Rows of two runs (compare, plan vs measured) match on the point key and the labels.
POINT_LABELS = ("size_name", "batch_mode")
MATCH_COLUMNS = (POINT_LABELS[0], *POINT_KEY, POINT_LABELS[1])


def point_key(values) -> tuple:
    """A row's (or a dict's) POINT_KEY as comparable text, the same whether the row was read back or built here.

    Missing and empty cells are "", whole floats integers, booleans and text lower case.
    """
    out = []
    for column in POINT_KEY:
        value = values.get(column)
        if value is None or (isinstance(value, float) and value != value):
            value = ""
        elif isinstance(value, float) and value == int(value):
            value = int(value)
        out.append(str(value).lower())
    return tuple(out)


# ------------------------------------------------------------------ duplicates

# Besides POINT_KEY, what keeps two records of one point apart: where each came from, and its labels.
RECORD_EXTRA_COLUMNS = ("row_source", "topology", "size_name", "batch_mode")


def point_columns(frame: pd.DataFrame) -> list[str]:
    """The columns of ``frame`` that identify a grid point (empty when it holds no jaxscale rows)."""
    if not {"strategy", "n_devices"} <= set(frame.columns):
        return []
    return [c for c in (*POINT_KEY, *RECORD_EXTRA_COLUMNS) if c in frame.columns]


def run_labels(frame: pd.DataFrame, fallback: str = "") -> pd.Series:
    """Each row's run: its ``run_id``, or ``fallback`` (e.g. the file it came from) where it has none."""
    if "run_id" not in frame.columns:
        return pd.Series(fallback, index=frame.index, dtype=object)
    ids = frame["run_id"].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    return ids.where(ids != "", fallback)


def last_run_id(frame: pd.DataFrame | None) -> str | None:
    """The run id of the last row that has one, or None."""
    if frame is None:
        return None
    ids = run_labels(frame)
    ids = ids[ids != ""]
    return str(ids.iloc[-1]) if len(ids) else None


def drop_duplicates(frame: pd.DataFrame, runs: pd.Series | None = None) -> tuple[pd.DataFrame, int]:
    """Drop rows that repeat an earlier row's run and point: the same measurement recorded or given twice.

    Rows of different runs for the same point are kept: they are repeated
    measurements. Args: ``runs`` labels each row's run (default
    ``run_labels(frame)``: the run id, one run for rows without one).

    Returns:
      (the rows left, in their order; how many were dropped). A frame without
      jaxscale's point columns is returned whole.
    """
    columns = point_columns(frame)
    if not columns or frame.empty:
        return frame, 0
    runs = run_labels(frame) if runs is None else runs
    key = frame[columns].astype(str).assign(_run=runs.astype(str).to_numpy())
    repeat = key.duplicated(keep="first").to_numpy()
    return frame[~repeat], int(repeat.sum())


def file_digest(path: Path | str) -> str:
    """A hash of a file's bytes: the same file given twice under two names is still one file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------ resuming


def profile_to_resume(resume: Path | str, name: str | None = None, sets: list[str] | tuple = (),
                      several_hosts: bool = False) -> tuple[Profile, pd.DataFrame | None]:
    """The profile of a sweep to resume from its report folder, and the rows already recorded there (or None).

    The folder's profile.toml is the sweep; a profile ``name`` or ``sets`` given
    too must define the same sweep. Without a profile.toml (a host of several
    that lacks the folder, or a folder from an older version) ``name`` is
    required and the folder's rows must be its own. The reader's warnings (a
    torn last line) are raised as warnings.

    Raises:
      ProfileError: one line naming the folder and what to give instead.
    """
    folder = Path(resume)
    if folder.exists() and not folder.is_dir():
        raise ProfileError(f"--resume {folder}: a file, not a report folder; give the folder `jaxscale run` wrote")
    if not several_hosts:  # (several hosts: process 0 takes the folder once it knows it is process 0)
        check_not_in_use(folder)  # a run still writing it is the reason, whatever the folder holds yet
    saved = folder / "profile.toml"
    recorded = read_rows(folder / "runs.csv") if (folder / "runs.csv").is_file() else None
    if saved.is_file():
        profile = load_profile(str(saved))
        if name or sets:
            given = load_profile(name or str(saved), list(sets))
            difference = profile_difference(profile, given)
            if difference:
                what = " ".join(filter(None, [name, *[f"--set {s}" for s in sets]]))
                raise ProfileError(f"--resume {folder}: {what} is not the sweep recorded there ({difference}); "
                                   "resume with --resume alone to continue it, or start a new run without --resume")
        return profile, recorded
    if not name:
        raise ProfileError(f"--resume {folder}: no profile.toml there; give a report folder written by "
                           "`jaxscale run` (on hosts without that folder, also give the PROFILE and --set options "
                           "of the original run)")
    if not folder.exists() and not several_hosts:
        raise ProfileError(f"--resume {folder}: no such folder")
    profile = load_profile(name, list(sets))
    if recorded is not None and len(recorded) and "profile" in recorded.columns:
        others = sorted(set(recorded["profile"].dropna().astype(str)) - {profile.run.name})
        if others:
            raise ProfileError(f"--resume {folder}: its runs.csv holds rows of profile {others[0]!r}, not of "
                               f"{profile.run.name!r} ({profile.source}); give the profile that recorded them")
    return profile, recorded


# ------------------------------------------------------------------ tables for analysis


def table_path(name: str | Path) -> Path:
    """The CSV a path names: the file itself, or a report folder's runs.csv; a ValueError naming it otherwise."""
    path = Path(name)
    if path.is_dir():
        if not (path / "runs.csv").is_file():
            raise ValueError(f"{name}: a folder without runs.csv; give a report folder written by `jaxscale "
                             "run` or `jaxscale plan`, or a CSV file")
        path = path / "runs.csv"
    elif not path.is_file():
        raise ValueError(f"{name}: no such file or folder; give the path of a CSV (a runs.csv or any table) "
                         "or of a report folder")
    if path.stat().st_size == 0:
        raise ValueError(f"{name}: the file is empty; expected a CSV with a header line")
    return path


def read_table(path: Path, name: str | Path) -> pd.DataFrame:
    """read_rows of a CSV that must hold rows; a ValueError naming ``name`` when it cannot be read or has none."""
    try:
        frame = read_rows(path)
    except (UnicodeDecodeError, pd.errors.ParserError, csv.Error) as e:
        raise ValueError(f"{name}: not a readable CSV ({str(e).splitlines()[0] if str(e) else e})") from None
    if frame.empty:
        raise ValueError(f"{name}: has a header but no rows")
    return frame


def load_tables(paths: Sequence[str | Path]) -> tuple[pd.DataFrame, list[str]]:
    """Read and concatenate CSVs (or report folders' runs.csv) for analysis; a problem is a ValueError naming the file.

    A file given twice is read once, and rows that repeat a run's point (the
    same run_id, or the same file, and the same grid point) are dropped. The
    reader's warnings (a torn last line) are raised as warnings.

    Returns:
      (the rows, one note per file read once and per duplicate dropped).
    """
    frames, seen, notes = [], {}, []
    for name in paths:
        path = table_path(name)
        digest = file_digest(path)
        if digest in seen:
            notes.append(f"{name} holds the same rows as {seen[digest]}; read once")
            continue
        seen[digest] = name
        frame = read_table(path, name)
        frames.append(frame.assign(_file=len(frames)))
    rows = pd.concat(frames, ignore_index=True)
    runs = run_labels(rows, "").where(run_labels(rows, "") != "", "file " + rows["_file"].astype(str))
    rows, dropped = drop_duplicates(rows.drop(columns="_file"), runs)
    if dropped:
        notes.append(f"dropped {dropped} duplicate row(s): the same run and grid point recorded twice (kept the first)")
    return rows.reset_index(drop=True), notes
