"""The row schema of runs.csv; appending rows durably; reading them back.

Each row is appended and fsync'd the moment its point finishes, so a sweep
killed at any instant leaves a file whose complete lines are all valid rows.
A torn last line (the write that was interrupted) is dropped by the reader
with a warning.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 2

COLUMNS: tuple[str, ...] = (
    "schema_version", "timestamp_utc", "profile", "row_source", "status", "error",
    # grid point
    "size_name", "strategy", "n_devices", "n_processes", "hosts", "mesh_shape", "d_model", "n_layers", "n_heads", "d_ff",
    "seq_len", "vocab", "global_batch", "batch_mode", "dtype", "remat", "attention", "scan_layers", "xla_flags",
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

FAILURE_STATUSES = ("compile_error", "oom", "over_budget", "error", "crashed")
# Statuses of rows that carry no failure: measured, or compiled for a target (jaxscale plan).
SUCCESS_STATUSES = ("ok", "planned")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RowWriter:
    """Appends rows to a CSV, header once, each row flushed and fsync'd."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            _truncate_torn_tail(self.path)
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
        self._write_line([_cell(row.get(c)) for c in COLUMNS])

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a kill, so appended rows start on a fresh line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)


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
    from jaxscale.grid import KEY_COLUMNS, TEXT_KEY_COLUMNS

    out = []
    for column in KEY_COLUMNS:
        value = row[column]
        if column in TEXT_KEY_COLUMNS:
            out.append("" if value is None or (isinstance(value, float) and value != value) else str(value))
        else:
            out.append(int(value))
    return tuple(out)
