"""Which runs.csv rows may share a fit: derived columns, usable values, groups and families.

A family is the set of rows fitted against one x: every config column
(``CONFIG_COLUMNS``) that is not the x or tied to it (``X_LINKED``) splits it,
so a CPU run and a GPU run, or a measured run and a plan, never share a fit.
Everything here is a pure function of DataFrames; nothing prints or touches files.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np
import pandas as pd

from jaxscale.records import CONFIG_COLUMNS, SUCCESS_STATUSES

MEMORY_COLUMN = "memory_per_device_bytes"
STATE_COLUMN = "state_bytes"
ACTIVATION_COLUMN = "activation_bytes"
SHARED_HOST_NOTE = "devices share one host's cores (backend cpu): no strong- or weak-scaling speed-up is possible"

# Columns that follow x within a family; they must take one value per x (else the analyzer refuses).
X_LINKED = {
    "n_devices": ("mesh_shape", "hosts"),
    "params": ("size_name", "d_model", "n_layers", "n_heads", "d_ff", "vocab"),
    "tokens_per_step": ("global_batch", "per_device_batch"),
}


def numeric_column(df: pd.DataFrame, column: str) -> pd.Series:
    """The column as floats (NaN where a value is not a number; all NaN when the column is absent)."""
    if column not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def succeeded(df: pd.DataFrame) -> pd.Series:
    """Which rows have a success status (records.SUCCESS_STATUSES; every row of a CSV without a status column)."""
    if "status" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["status"].astype(str).str.strip().isin(SUCCESS_STATUSES)


def usable_rows(df: pd.DataFrame, columns: Iterable[str]) -> pd.Series:
    """Rows with a success status (records.SUCCESS_STATUSES, when there is a status column)
    and positive, finite values in ``columns``."""
    mask = succeeded(df)
    for column in columns:
        values = numeric_column(df, column)
        mask &= np.isfinite(values) & (values > 0)
    return mask


def group_positions(df: pd.DataFrame, by: Sequence[str]) -> list[tuple[dict, np.ndarray]]:
    """(group key, row positions) per group of ``by``, in order of first appearance; NaN is a value."""
    if not by:
        return [({}, np.arange(len(df)))]
    if df.empty:
        return []
    indices = df.groupby(list(by), sort=False, dropna=False).indices
    out = []
    for key, positions in indices.items():
        key = key if isinstance(key, tuple) else (key,)
        out.append((dict(zip(by, key)), np.asarray(positions)))
    out.sort(key=lambda item: item[1][0])
    return out


def grouped(df: pd.DataFrame, by: Sequence[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    """(group key, rows) per group of ``by``, as ``group_positions`` orders them."""
    for key, positions in group_positions(df, by):
        yield key, df.iloc[positions]


def positive(values: np.ndarray) -> np.ndarray:
    """Which values are positive and finite."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values > 0)


def require_columns(df: pd.DataFrame, columns: Iterable[str]) -> None:
    """Raise a ValueError naming the columns that ``df`` lacks."""
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise ValueError(f"columns not found: {missing}; available: {list(df.columns)}")


def unusable_values(df: pd.DataFrame, columns: Iterable[str]) -> dict[str, int]:
    """Per column, the rows with a success status whose value a log-log fit cannot use: zero, negative or infinite.

    Empty cells are missing, not counted; rows that failed are left out of
    every fit anyway and not counted either.
    """
    ok = succeeded(df)
    out = {}
    for column in dict.fromkeys(columns):
        if column not in df.columns:
            continue
        values = numeric_column(df, column)[ok]
        bad = int((np.isinf(values) | (values <= 0)).sum())
        if bad:
            out[column] = bad
    return out


def why_no_fits(df: pd.DataFrame) -> str:
    """Why rows give no default fit, in one sentence (for a fits table that came back empty)."""
    if df.empty:
        return "there are no rows"
    ok = succeeded(df)
    if not ok.any():
        counts = df["status"].astype(str).value_counts() if "status" in df.columns else pd.Series(dtype=int)
        return (f"every one of the {len(df)} rows failed ({', '.join(f'{c} {s}' for s, c in counts.items())}), "
                "so there is nothing to fit")
    n_ok = int(ok.sum())
    if n_ok < 3:
        return (f"{n_ok} of the {len(df)} rows succeeded; a fit needs at least 3 points at 2 or more values of its "
                "x (device count, parameters or tokens per step) that share everything else")
    return (f"{n_ok} rows succeeded, but no set of 3 or more that differ only in device count, parameters or tokens "
            "per step; a fit needs points that share everything else (size, strategy, batch, dtype, ...)")


def add_memory_columns(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with per-device memory split into state and the rest.

    Added columns:
      memory_per_device_bytes: ``peak_bytes_in_use`` where that is a positive
        number (the allocator's measurement), else ``compiled_total_bytes``.
      memory_source: which of the two it is ('' with neither).
      state_bytes: param_bytes + opt_state_bytes (the shards one device holds).
      activation_bytes: memory_per_device_bytes − state_bytes: activations,
        gradients, the batch and XLA's temporaries (NaN unless positive).
    """
    out = df.copy()
    peak, compiled = numeric_column(df, "peak_bytes_in_use"), numeric_column(df, "compiled_total_bytes")
    has_peak = np.isfinite(peak) & (peak > 0)
    memory = peak.where(has_peak, compiled)
    out[MEMORY_COLUMN] = memory
    out["memory_source"] = np.where(has_peak, "peak_bytes_in_use",
                                    np.where(np.isfinite(compiled), "compiled_total_bytes", ""))
    state = numeric_column(df, "param_bytes") + numeric_column(df, "opt_state_bytes")
    out[STATE_COLUMN] = state
    rest = memory - state
    out[ACTIVATION_COLUMN] = rest.where(rest > 0)
    return out


add_memory_column = add_memory_columns  # the earlier name


def prepare_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """A copy of runs.csv rows with the derived columns the default fits use.

    Adds the memory columns (``add_memory_columns``), ``per_device_batch``
    (global_batch / n_devices, for batch_mode weak) and ``model_axis`` (the model
    axis of an fsdp_tp mesh, which the profile fixes while the device count varies).
    """
    if MEMORY_COLUMN in runs.columns and "model_axis" in runs.columns:
        return runs
    out = add_memory_columns(runs)
    for column in ("scan_layers",):
        if column in out.columns:
            # runs.csv writes booleans as true/false, a CSV saved by pandas as True/False: one value either way.
            out[column] = out[column].map(lambda v: str(v).lower() if isinstance(v, (bool, np.bool_, str)) else v)
    if {"global_batch", "n_devices", "batch_mode"} <= set(out.columns):
        weak = out["batch_mode"].astype(str) == "weak"
        out["per_device_batch"] = (numeric_column(out, "global_batch") / numeric_column(out, "n_devices")).where(weak)
    if {"mesh_shape", "strategy"} <= set(out.columns):
        model = out["mesh_shape"].astype(str).str.extract(r"model:(\d+)")[0]
        out["model_axis"] = pd.to_numeric(model, errors="coerce").where(out["strategy"] == "fsdp_tp")
    return out


def family_frame(rows: pd.DataFrame, xs: Sequence[str]) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The rows as one family against ``xs`` sees them, and the columns that split it.

    Every config column (``CONFIG_COLUMNS``) present in the rows splits the family,
    except the xs and the columns tied to them (``X_LINKED``). Under weak scaling
    the global batch grows with the device count, so for a device-count x it is
    blanked on weak rows (``per_device_batch`` splits them instead).

    Raises:
      ValueError: a tied column takes two values at one x within a group (rows
        that cannot share a fit), naming the column and the values.
    """
    xs = tuple(xs)
    linked = tuple(dict.fromkeys(c for x in xs for c in X_LINKED.get(x, ())))
    frame = rows
    if "n_devices" in xs and "batch_mode" in rows.columns:
        weak = rows["batch_mode"].astype(str) == "weak"
        if weak.any():
            frame = rows.copy()
            for column in ("global_batch", "tokens_per_step"):
                if column in frame.columns:
                    frame[column] = numeric_column(frame, column).where(~weak)
    by = tuple(c for c in CONFIG_COLUMNS if c in frame.columns and c not in xs and c not in linked)
    tied = [c for c in linked if c in frame.columns and c not in by]
    if tied and len(xs) == 1 and xs[0] in frame.columns and len(frame):
        x = xs[0]
        counts = frame.assign(_x=numeric_column(frame, x)).groupby([*by, "_x"], sort=False, dropna=False)[tied].nunique(
            dropna=False)
        bad = counts[(counts > 1).any(axis=1)]
        if len(bad):
            key = bad.index[0] if isinstance(bad.index[0], tuple) else (bad.index[0],)
            column = next(c for c in tied if bad.iloc[0][c] > 1)
            at = key[-1]
            where = dict(zip(by, key[:-1]))
            sel = numeric_column(frame, x) == at
            for c, v in where.items():
                sel &= frame[c].isna() if pd.isna(v) else frame[c] == v
            seen = frame.loc[sel, column].drop_duplicates().tolist()[:2]
            label = ", ".join(f"{k}={v}" for k, v in where.items() if pd.notna(v)) or "all rows"
            raise ValueError(f"column {column!r} takes the values {seen[0]!r} and {seen[1]!r} at {x}={at:g} "
                             f"within one group ({label}); rows that differ in {column} cannot share a fit: "
                             f"analyze them separately or remove one set")
    return frame, by


def shared_host(key: dict) -> bool:
    """Whether a group's devices share one host's cores (measured rows of backend cpu): see ``SHARED_HOST_NOTE``."""
    source = key.get("row_source")
    measured = source is None or (isinstance(source, float) and math.isnan(source)) or source == "measured"
    return measured and str(key.get("backend", "")).lower() == "cpu"


def fit_points(runs: pd.DataFrame, fit_row, prepared: bool = False) -> pd.DataFrame:
    """The usable (x, y) points behind one row of a fits table, for plotting.

    Args:
      runs: the rows that were fitted.
      fit_row: a row of ``fit_table`` / ``default_fits`` (dict or Series).
      prepared: ``runs`` is already ``family_frame(prepare_rows(runs), (x,))[0]``
        for this row's x (saves the work when plotting many series).

    Returns:
      A frame with columns x and y, in the rows' order.
    """
    x, y = fit_row["x"], fit_row["y"]
    by = [c for c in (fit_row["by"] if isinstance(fit_row["by"], str) else "").split(",") if c]
    family = fit_row.get("family") if hasattr(fit_row, "get") else None
    if isinstance(family, str) and family and not prepared:
        runs = prepare_rows(runs)
        if x in runs.columns:
            runs = family_frame(runs, (x,))[0]
    elif y not in runs.columns:
        runs = prepare_rows(runs)
    if x not in runs.columns or y not in runs.columns:
        return pd.DataFrame({"x": [], "y": []})
    mask = usable_rows(runs, (x, y))
    for column in by:
        if column not in runs.columns:
            return pd.DataFrame({"x": [], "y": []})
        value = fit_row[column]
        mask &= runs[column].isna() if pd.isna(value) else runs[column] == value
    return pd.DataFrame({"x": numeric_column(runs, x)[mask].to_numpy(), "y": numeric_column(runs, y)[mask].to_numpy()})


def require_numeric(frame: pd.DataFrame, column: str, source: str) -> None:
    """A ValueError naming ``source``, the column and the first bad row unless the column holds numbers
    (in its successful rows, where the frame has a status)."""
    if column not in frame.columns:
        raise ValueError(f"{source}: no column {column!r}; columns are: {', '.join(map(str, frame.columns))}")
    values = frame[column]
    if "status" in frame.columns:
        values = values[frame["status"].astype(str).isin(SUCCESS_STATUSES)]
    present = values[values.astype(str).str.strip() != ""].dropna()
    numbers = pd.to_numeric(present, errors="coerce")
    bad = present[numbers.isna()]
    if len(bad):
        raise ValueError(f"{source}: column {column!r} needs numbers but has {bad.iloc[0]!r} "
                         f"(row {bad.index[0] + 2}); fix or remove such rows")


def xy_groups(df: pd.DataFrame, x: str, ys: Sequence[str], by: Sequence[str]):
    """Each group of rows (by its ``by`` values) and each y: (the group's key, y, the mask of rows usable for
    x and y, their x values, their y values). A ValueError names a column the rows lack."""
    require_columns(df, (x, *by, *ys))
    for key, group in grouped(df, by):
        for y in ys:
            mask = usable_rows(group, (x, y))
            yield key, y, mask, numeric_column(group, x)[mask].to_numpy(), numeric_column(group, y)[mask].to_numpy()


def check_columns(rows: pd.DataFrame, source: str, x: str | None = None, ys: Sequence[str] = (),
                  by: Sequence[str] = (), expectations: Sequence[tuple[str, str]] = (),
                  higher_is_better: Sequence[str] = (), lower_is_better: Sequence[str] = ()) -> None:
    """A ValueError naming ``source`` and the column unless the rows hold what the analysis asked for reads.

    With ``x`` and ``ys`` (any CSV): those columns as numbers, and the group and direction columns present.
    Without (jaxscale rows): the columns of a runs.csv, its fitted ones numeric. Each expectation's (y, x)
    numeric too, unless derived from the memory columns.
    """
    if x or ys:
        if not (x and ys):
            raise ValueError("--x and --y go together: --x COL --y COL [--y COL ...]")
        for column in (x, *ys):
            require_numeric(rows, column, source)
        for flag, columns in (("--by", by), ("--higher-is-better", higher_is_better),
                              ("--lower-is-better", lower_is_better)):
            for column in columns:
                if column not in rows.columns:
                    raise ValueError(f"{source}: no {flag} column {column!r}; columns are: "
                                     f"{', '.join(map(str, rows.columns))}")
    else:
        for column in ("n_devices", "params", "strategy", "step_time_s"):
            if column not in rows.columns:
                raise ValueError(f"{source}: no column {column!r}, so these are not jaxscale rows; "
                                 "for any other CSV give --x COL --y COL [--by COL]")
        for column in ("n_devices", "params", "step_time_s", "tokens_per_s"):
            if column in rows.columns:
                require_numeric(rows, column, source)
    for y, x_ in expectations:
        for column in (x_, y):
            if column not in (MEMORY_COLUMN, STATE_COLUMN, ACTIVATION_COLUMN):
                require_numeric(rows, column, source)
