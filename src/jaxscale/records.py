"""Report folders and the rows in them: the row schema of runs.csv, appending rows durably, reading them back.

Each row is appended and fsync'd the moment its point finishes, so a sweep
killed at any instant leaves a file whose complete lines are all valid rows.
A torn last line (the write that was interrupted) is dropped by the reader
with a warning.

A report folder belongs to one run: it is created exclusively (never reused),
holds the run's id (``run_id.txt``, stamped on every row it writes), and has
one writer at a time (``.lock``, an advisory lock the kernel releases when its
holder dies, so a killed run never blocks the next one). Rows carry their
run's id, so rows of one run given twice can be told from two runs of the
same point (``drop_duplicates``).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import hashlib
import io
import os
import secrets
import shutil
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

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


# ------------------------------------------------------------------ report folders

RUN_ID_FILE = "run_id.txt"
LOCK_FILE = ".lock"
MIN_FREE_BYTES = 1 << 20  # below this a folder counts as full: a runs.csv row alone is a few kB


class ReportDirError(ValueError):
    """A report or output folder that cannot be used; one line naming it and what to do."""


def stamped(stem: str) -> str:
    """A report folder name: ``stem`` and the UTC time, to the second (ReportDir.create numbers clashes)."""
    return f"{stem}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"


def new_run_id() -> str:
    """A run id: the UTC start time and a random suffix (text, never read back as a number)."""
    return f"{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def read_run_id(folder: Path | str) -> str | None:
    """The run id kept in a report folder, or None."""
    try:
        text = (Path(folder) / RUN_ID_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def _existing_ancestor(path: Path) -> Path:
    """The nearest of path and its parents that exists; a file among them is refused."""
    path = Path(os.path.abspath(path))
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def check_output_dir(path: Path | str, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be written, before any work starts.

    Raises:
      ReportDirError: a file where the folder (or one above it) would be, a
        folder this process cannot create entries in (permissions, a read-only
        file system), or one with less than MIN_FREE_BYTES free.
    """
    where = _existing_ancestor(Path(path))
    if not where.is_dir():
        raise ReportDirError(f"{flag} {path}: {where} is a file, not a folder; give a folder path "
                             "(it is created if missing)")
    try:
        probe = Path(os.path.join(where, f".jaxscale-probe-{os.getpid()}-{secrets.token_hex(3)}"))
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise ReportDirError(f"{flag} {path}: cannot write in {where} ({e.strerror or e}); give a folder "
                             "you can write to") from None
    try:
        stats = os.statvfs(where)
    except OSError:
        return
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        raise ReportDirError(f"{flag} {path}: no space left on the file system of {where} ({free} bytes free); "
                             "free some space or give a folder on another disk")


def os_error_line(e: OSError, what: str) -> str:
    """One line for an OSError met while writing ``what``."""
    name = e.filename or what
    return f"{name}: {e.strerror or e}" + ("; free some space" if e.errno == errno.ENOSPC else "")


class ReportDir:
    """A report folder held by this process: created exclusively or reopened to resume, and locked.

    Use ``ReportDir.create`` or ``ReportDir.reopen``; ``release`` (or the
    context manager) lets go of the lock, ``discard`` also removes a folder
    this process created and wrote no rows to.

    Attributes:
      path: the folder.
      run_id: the run's id, stamped on its rows.
      created: True when this process created the folder.
    """

    def __init__(self, path: Path, run_id: str, created: bool, lock, parents: tuple[Path, ...] = ()):
        self.path, self.run_id, self.created, self._lock = path, run_id, created, lock
        self._parents = parents  # folders above it this process created, innermost first

    @classmethod
    def for_run(cls, run_name: str, out: Path | str | None) -> "ReportDir":
        """A run's new report folder ``<out>/<name>-<UTC time>`` (``reports`` by default), held by this process.

        Raises:
          ReportDirError: ``out`` cannot hold it.
        """
        return cls.create(out or "reports", stamped(run_name))

    @classmethod
    def create(cls, parent: Path | str, stem: str, flag: str = "--out") -> "ReportDir":
        """A new folder ``parent/stem`` (``stem-2``, ``stem-3``, ... when taken): never an existing one.

        Raises:
          ReportDirError: the parent cannot hold it (see ``check_output_dir``).
        """
        parent = Path(parent)
        check_output_dir(parent, flag)
        existing = _existing_ancestor(parent)
        made = tuple(p for p in (Path(os.path.abspath(parent)), *Path(os.path.abspath(parent)).parents)
                     if len(p.parts) > len(existing.parts))
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ReportDirError(f"{flag} {parent}: {os_error_line(e, str(parent))}") from None
        for i in range(1, 10_000):
            path = parent / (stem if i == 1 else f"{stem}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise ReportDirError(f"{flag} {parent}: {os_error_line(e, str(path))}") from None
            run_id = new_run_id()
            try:
                lock = _lock(path)
                (path / RUN_ID_FILE).write_text(run_id + "\n")
            except BaseException:
                shutil.rmtree(path, ignore_errors=True)
                raise
            return cls(path, run_id, True, lock, made)
        raise ReportDirError(f"{flag} {parent}: {stem} and 9,998 numbered variants exist already; clean up "
                             "or give another --out")

    @classmethod
    def reopen(cls, path: Path | str, rows: pd.DataFrame | None = None) -> "ReportDir":
        """An existing report folder, locked for this process, to resume a run in.

        The run keeps its id: the folder's ``run_id.txt``, else that of its
        last row, else a new one (written to the folder).

        Raises:
          ReportDirError: not a folder, or another process holds it.
        """
        path = Path(path)
        if not path.is_dir():
            raise ReportDirError(f"--resume {path}: " + ("not a folder; give the report folder `jaxscale run` "
                                                         "wrote" if path.exists() else "no such folder"))
        lock = _lock(path)
        try:
            run_id = read_run_id(path)
            if run_id is None:
                run_id = new_run_id()
                if rows is not None and "run_id" in rows.columns:
                    ids = run_labels(rows)
                    ids = ids[ids != ""]
                    run_id = str(ids.iloc[-1]) if len(ids) else run_id
                (path / RUN_ID_FILE).write_text(run_id + "\n")
        except OSError as e:
            _unlock(lock)
            raise ReportDirError(f"--resume {path}: {os_error_line(e, str(path))}") from None
        except BaseException:
            _unlock(lock)
            raise
        return cls(path, run_id, False, lock)

    def release(self) -> None:
        """Let go of the lock (idempotent)."""
        if self._lock is not None:
            _unlock(self._lock)
            self._lock = None

    def discard(self) -> None:
        """Release, and remove the folder if this process created it and recorded no row in it."""
        self.release()
        csv_path = self.path / "runs.csv"
        has_rows = csv_path.exists() and len(csv_path.read_bytes().splitlines()) > 1
        if self.created and not has_rows:
            shutil.rmtree(self.path, ignore_errors=True)
            for folder in self._parents:  # the --out folders made for it, if nothing else went there since
                try:
                    folder.rmdir()
                except OSError:
                    break

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder_text() -> str:
    command = " ".join(["jaxscale", *sys.argv[1:]]) if sys.argv else "python"
    since = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"process {os.getpid()} on {socket.gethostname()} since {since} ({command})"


def _lock(folder: Path):
    """Take the folder's advisory lock, writing who holds it; refuse when another process has it.

    The lock is flock(2) on ``.lock``: the kernel drops it when the holding
    process ends, however it ends, so a lock left by a killed run is stale and
    taken over. File systems without flock are used unlocked.
    """
    import fcntl

    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise ReportDirError(f"{folder}: cannot create its lock file ({e.strerror or e}); give a folder "
                             "you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise ReportDirError(_in_use(folder, holder)) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        warnings.warn(f"{folder}: the file system cannot lock files ({e.strerror}); nothing stops a second "
                      "run from writing here at the same time")
    text = _holder_text().encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text + b"\n", 0)
    return fd


def _in_use(folder: Path, holder: str) -> str:
    return f"{folder}: in use by {holder}; wait for it to end or stop it, or give another folder"


def check_not_in_use(folder: Path | str) -> None:
    """Refuse a report folder another process holds (see ``ReportDir``), without taking it.

    Raises:
      ReportDirError: naming the holder.
    """
    import fcntl

    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return  # no lock file: nobody holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ReportDirError(_in_use(Path(folder), os.pread(fd, 4096, 0).decode(errors="replace").strip()
                                     or "another process")) from None
    except OSError:
        pass
    finally:
        os.close(fd)  # closing drops the shared lock taken to look


def _unlock(fd) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)
