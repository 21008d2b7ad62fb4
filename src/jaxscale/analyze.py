"""jaxscale's analysis of runs.csv rows: ``analyze_rows`` computes every table of a report into an ``Analysis``.

The default fits are the standard families (``default_fits``: ideals per
family); beside them: the joint fit of step time on params and devices, the
scaling efficiency, the USL of throughput (``usl.default_usl``), predictions beyond
the largest x (``predict_table``), plans against measurements and claimed
exponents (expectations). Given an x and ys, ``analyze_rows`` fits any table's
columns instead. Everything here is a pure function of DataFrames; nothing
prints or touches files (report.py formats what these return).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np
import pandas as pd

from jaxscale.families import (ACTIVATION_COLUMN, MEMORY_COLUMN, SHARED_HOST_NOTE, STATE_COLUMN,
                               family_frame, group_positions, grouped, numeric_column, prepare_rows, require_columns,
                               shared_host, succeeded, unusable_values, usable_rows, xy_groups)
from jaxscale.powerlaw import (DEFAULT_TOLERANCE, FIT_COLUMNS, IdealFn, check_confidence, check_tolerance,
                               direction_of, fit_power_law, fit_table, grade, join_notes, joint_fit, t_critical,
                               t_test)
from jaxscale.records import COLLECTIVE_COLUMNS, CONFIG_COLUMNS, MATCH_COLUMNS
from jaxscale.usl import default_usl, fit_usl, usl_table

SHARDED_STRATEGIES = ("fsdp", "tp", "fsdp_tp")
BATCH_SPLITTING_STRATEGIES = ("dp", "fsdp", "fsdp_tp")
# Quantities that measure speed: on devices that share one host's cores they cannot scale.
SPEED_COLUMNS = ("step_time_s", "tokens_per_s")
PREDICTION_COLUMNS = ("by", "kind", "method", "y", "x", "x_value", "predicted", "pi_low", "pi_high", "confidence",
                      "measured", "error", "within_interval", "x_max_fitted", "n_points", "note")
# The x and y columns of the default fits a row must hold a positive, finite value in to count.
DEFAULT_COLUMNS = ("n_devices", "params", "tokens_per_step", "step_time_s", "tokens_per_s", "predicted_step_time_s")


# ------------------------------------------------------------------ default fits


def devices_ideal(key: dict, x: str, y: str) -> float | None:
    """The ideal exponent of y against n_devices for a group (see ``default_fits``)."""
    if y == "tokens_per_s":
        return 1.0
    if y in ("step_time_s", "predicted_step_time_s"):
        return {"strong": -1.0, "weak": 0.0}.get(key.get("batch_mode"))
    strategy = key.get("strategy")
    if y == STATE_COLUMN:
        return 0.0 if strategy == "dp" else -1.0 if strategy in SHARDED_STRATEGIES else None
    if y == ACTIVATION_COLUMN and strategy in BATCH_SPLITTING_STRATEGIES:
        return {"strong": -1.0, "weak": 0.0}.get(key.get("batch_mode"))
    return None


def model_size_ideal(key: dict, x: str, y: str) -> float | None:
    """The ideal exponent of y against params: 1 for time, FLOPs and state; none for activations."""
    return None if y in (ACTIVATION_COLUMN, MEMORY_COLUMN) else 1.0


def _why_no_ideal(key: dict, y: str) -> str:
    if y == ACTIVATION_COLUMN and key.get("strategy") == "tp":
        return "no single ideal: tp replicates the batch and splits only part of the activations"
    return ""


@dataclasses.dataclass(frozen=True)
class Family:
    """A default fit family: ys against x, split by every config column not tied to x."""

    name: str
    x: str
    ys: tuple[str, ...]
    ideal: float | IdealFn | None


FAMILIES = (
    Family("devices", "n_devices", ("step_time_s", "tokens_per_s", "predicted_step_time_s", STATE_COLUMN,
                                    ACTIVATION_COLUMN, MEMORY_COLUMN), devices_ideal),
    Family("communication", "n_devices", COLLECTIVE_COLUMNS, lambda key, x, y: None),
    Family("model_size", "params", ("step_time_s", "predicted_step_time_s", STATE_COLUMN, ACTIVATION_COLUMN,
                                    MEMORY_COLUMN, "model_flops_per_step"), model_size_ideal),
    Family("tokens", "tokens_per_step", ("step_time_s", "predicted_step_time_s"), 1.0),
)


def _family_fits(rows: pd.DataFrame, family: Family, confidence: float, tolerance: float) -> pd.DataFrame | None:
    present = [y for y in family.ys if (numeric_column(rows, y) > 0).any()]
    if family.x not in rows.columns or not present:
        return None
    frame, by = family_frame(rows, (family.x,))
    # A group whose rows all sit at one x (one model size, one batch) has nothing to fit.
    keep = frame.groupby(list(by), sort=False, dropna=False)[family.x].transform("nunique") > 1 if by else (
        pd.Series(frame[family.x].nunique() > 1, index=frame.index))
    frame = frame[keep]
    if frame.empty:
        return None
    part = fit_table(frame, family.x, present, by, family.ideal, confidence, tolerance)
    ok = succeeded(frame).to_numpy()
    positions_by_group = [positions for _, positions in group_positions(frame, by)]
    all_failed = [not ok[positions].any() for positions in positions_by_group for _ in present]
    if family.name == "communication":
        # One device issues no collective: a zero there is a measurement, not a dropped row.
        part["n_dropped"] = [int((~ok[positions]).sum()) for positions in positions_by_group for _ in present]
    # A y that a group's successful rows never have (collectives dp never issues, measured columns of planned
    # rows) is no failed fit; a group whose every point failed is reported.
    part = part[(part["n_points"] > 0).to_numpy() | np.array(all_failed, dtype=bool)]
    if MEMORY_COLUMN in present:
        # The total is fitted (without an ideal) only where state and the rest cannot be told apart.
        split = {_nan_key(tuple(r[c] for c in by)) for _, r in part[(part["y"] == STATE_COLUMN)
                                                                   & (part["n_points"] > 0)].iterrows()}
        part = part[(part["y"] != MEMORY_COLUMN).to_numpy() | np.array(
            [_nan_key(tuple(r[c] for c in by)) not in split for _, r in part.iterrows()], dtype=bool)]
    part = part.copy()
    for i, r in part.iterrows():
        key = {c: r[c] for c in by}
        if family.x == "n_devices" and r["y"] in SPEED_COLUMNS and shared_host(key) and pd.notna(
                r["ideal_exponent"]):
            part.loc[i, ["assessment", "regime"]] = ["not applicable", ""]
            part.at[i, "note"] = join_notes(SHARED_HOST_NOTE, r["note"] if r["assessment"] != "inconclusive"
                                             else "")
        elif family.x == "n_devices" and pd.isna(r["ideal_exponent"]) and _why_no_ideal(key, r["y"]):
            part.at[i, "note"] = join_notes(_why_no_ideal(key, r["y"]), r["note"])
    part.insert(0, "family", family.name)
    return part


def _nan_key(key: tuple) -> tuple:
    return tuple("\0nan" if (isinstance(v, float) and math.isnan(v)) or v is None else v for v in key)


def default_fits(runs: pd.DataFrame, confidence: float = 0.95, tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """The standard fits of jaxscale's runs.csv rows, in one frame with a ``family`` column.

    Every family is split by each config column present (``CONFIG_COLUMNS``:
    where the row came from, backend, device kind, versions, model size,
    strategy, batch, dtype, remat, attention, scan_layers, XLA flags, ...) that is
    not its x or tied to it, so a CPU run and a GPU run, or a measured run and a
    plan, never share a fit.

    Families (a y is fitted only where it has values; a group whose rows all sit
    at one x is skipped):
      devices, against n_devices: step_time_s and predicted_step_time_s (ideal
        −1 strong, 0 weak), tokens_per_s (1), state_bytes (param + optimizer
        shards: 0 for dp, −1 for fsdp, tp, fsdp_tp), activation_bytes (the rest:
        −1 strong and 0 weak for the batch-splitting dp, fsdp, fsdp_tp; no ideal
        for tp), and memory_per_device_bytes (no ideal) only where state is unknown.
        On measured CPU rows, step time and throughput are ``not applicable``:
        the virtual devices share one host's cores.
      communication: the collective byte columns against n_devices, no ideal.
      model_size, against params: step time (1), state (1), activations (no
        ideal), model_flops_per_step (1).
      tokens, against tokens_per_step (several batches per point): step time (1).

    Args:
      runs: runs.csv rows (see records.COLUMNS); numbers may be strings.
      confidence: level of the exponent intervals.
      tolerance: half-width of the band around each ideal exponent.

    Returns:
      family, the union of the families' group columns, ``FIT_COLUMNS``.

    Raises:
      ValueError: rows that differ in a column tied to x at one x (see ``family_frame``).
    """
    rows = prepare_rows(runs)
    parts = [p for f in FAMILIES if (p := _family_fits(rows, f, confidence, tolerance)) is not None and len(p)]
    if not parts:
        return pd.DataFrame(columns=["family", *FIT_COLUMNS])
    out = pd.concat(parts, ignore_index=True)
    group_columns = [c for c in CONFIG_COLUMNS if c in out.columns]
    return out[["family", *group_columns, *FIT_COLUMNS]].reset_index(drop=True)


# ------------------------------------------------------------------ joint fit


def _joint_ideal(key: dict, x: str, y: str) -> float | None:
    if x == "params":
        return 1.0
    if x == "n_devices" and not shared_host(key):
        return {"strong": -1.0, "weak": 0.0}.get(key.get("batch_mode"))
    return None


def default_joint_fit(runs: pd.DataFrame, confidence: float = 0.95,
                      tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """Step time on params and n_devices, per group of every config column not tied to either.

    Measured rows fit step_time_s, planned rows predicted_step_time_s. Ideals:
    b_params 1; b_n_devices −1 strong, 0 weak, and none on CPU rows (the
    devices share one host's cores: the verdict reads ``not applicable``).
    Groups a y never appears in are left out.
    """
    rows = prepare_rows(runs)
    xs = ("params", "n_devices")
    if not set(xs) <= set(rows.columns):
        return joint_fit(pd.DataFrame(columns=[*xs, "step_time_s"]), "step_time_s", xs, (), confidence)
    frame, by = family_frame(rows, xs)
    parts = []
    for y in ("step_time_s", "predicted_step_time_s"):
        if not (numeric_column(frame, y) > 0).any():
            continue
        part = joint_fit(frame, y, xs, by, confidence, _joint_ideal, tolerance)
        part = part[part["n_points"] > 0].copy()
        for i, r in part.iterrows():
            if shared_host({c: r[c] for c in by}) and pd.notna(r.get("exponent_n_devices")):
                part.at[i, "assessment_n_devices"] = "not applicable"
                part.at[i, "note"] = join_notes(f"b_n_devices: {SHARED_HOST_NOTE}", r["note"])
        parts.append(part)
    if not parts:
        return joint_fit(frame.iloc[:0], "step_time_s", xs, by, confidence)
    return pd.concat(parts, ignore_index=True)


# ------------------------------------------------------------------ efficiency


def scaling_efficiency(runs: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Throughput per device relative to the group's smallest device count.

    efficiency = (tokens_per_s(n) / n) / (tokens_per_s(n_base) / n_base), where
    n_base is the smallest device count measured in the group (``base_n_devices``:
    2 for fsdp_tp, whose mesh needs a model axis, 1 for the others in the default
    grid). Repeated rows at one device count (a resumed sweep) are combined by
    their median.

    Args:
      runs: runs.csv rows; rows without a success status or a positive tokens_per_s are ignored.
      by: group columns; default the devices family's (see ``family_frame``).

    Returns:
      The group columns, n_devices, base_n_devices, tokens_per_s,
      tokens_per_s_per_device, efficiency, note (why the efficiency cannot
      approach 1, where that is known).
    """
    if by is None:
        rows = prepare_rows(runs)
        frame, by = family_frame(rows, ("n_devices",)) if "n_devices" in rows.columns else (rows, ())
    else:
        frame, by = runs, tuple(by)
    columns = [*by, "n_devices", "base_n_devices", "tokens_per_s", "tokens_per_s_per_device", "efficiency", "note"]
    require_columns(frame, (*by, "n_devices", "tokens_per_s"))
    rows_out = []
    for key, group in grouped(frame[usable_rows(frame, ("n_devices", "tokens_per_s"))], by):
        tps = numeric_column(group, "tokens_per_s").groupby(numeric_column(group, "n_devices")).median().sort_index()
        base_n, base_tps = tps.index[0], tps.iloc[0]
        note = SHARED_HOST_NOTE if shared_host(key) else ""
        for n, value in tps.items():
            rows_out.append({**key, "n_devices": int(n), "base_n_devices": int(base_n), "tokens_per_s": value,
                             "tokens_per_s_per_device": value / n, "efficiency": (value / n) / (base_tps / base_n),
                             "note": note})
    return pd.DataFrame(rows_out, columns=columns)


# ------------------------------------------------------------------ predictions


def _prediction_row(base: dict, kind: str, method: str, x_value: float, predicted: float, low: float, high: float,
                    n_points: int, x_max: float, note: str) -> dict:
    return {**base, "kind": kind, "method": method, "x_value": x_value, "predicted": predicted, "pi_low": low,
            "pi_high": high, "n_points": n_points, "x_max_fitted": x_max, "note": note}


def predict_table(df: pd.DataFrame, x: str, ys: str | Sequence[str], by: Sequence[str] = (),
                  confidence: float = 0.95, factors: Sequence[float] = (2, 4), usl: bool = True,
                  directions: dict[str, str] | None = None) -> pd.DataFrame:
    """Extrapolate each y beyond the largest x, and backtest the extrapolation.

    For each group and y, from the power-law fit of all usable points: the
    prediction at factor × the largest x with its prediction interval
    (``PowerLawFit.prediction_interval``). The backtest refits without every row
    at the largest x, predicts that x, and reports the measured value (the median
    of the rows there), error = predicted / measured − 1, and whether the
    measurement fell inside the interval. With ``usl`` and at least 5 distinct x
    (and 5 left for the backtest), the same rows come from the USL fit
    (``method`` usl; a cost y is fitted as 1/y and mapped back).

    Returns:
      The ``by`` columns, then ``PREDICTION_COLUMNS``: by, kind
      ('extrapolate' or 'backtest'), method ('power_law' or 'usl'), y, x (the x
      column), x_value, predicted, pi_low, pi_high, confidence, measured, error
      (relative: predicted / measured − 1), within_interval, x_max_fitted (the
      largest x of the fit used), n_points, note.
    """
    ys = (ys,) if isinstance(ys, str) else tuple(ys)
    by = tuple(by)
    check_confidence(confidence)
    directions = directions or {}
    rows = []
    for key, y, mask, xv, yv in xy_groups(df, x, ys, by):
        if np.unique(xv).size < 3:
            continue
        base = {**key, "by": ",".join(by), "y": y, "x": x, "confidence": confidence}
        note = SHARED_HOST_NOTE if shared_host(key) else ""
        top = xv.max()
        held = xv < top
        measured = float(np.median(yv[~held]))
        inverted = directions.get(y, direction_of(y)) == "lower"
        # The USL needs 3 parameters; with fewer than 5 counts its intervals have 1 dof and say nothing.
        models = [("power_law", 3)] + ([("usl", 5)] if usl else [])
        for method, minimum in models:
            def fit_and_predict(xs_, ys_, at):
                if method == "power_law":
                    fit = fit_power_law(xs_, ys_, confidence)
                    low, high = fit.prediction_interval(at)
                    return fit.predict(at), low, high
                fit = fit_usl(xs_, 1 / ys_ if inverted else ys_, confidence, model="usl")
                value, (low, high) = fit.predict(at), fit.prediction_interval(at)
                return (1 / value, 1 / high, 1 / low) if inverted else (value, low, high)

            if np.unique(xv).size < minimum:
                continue
            try:
                at = np.array([f * top for f in factors], dtype=float)
                value, low, high = fit_and_predict(xv, yv, at)
            except ValueError:
                continue
            for i, xa in enumerate(at):
                if not np.isfinite(low[i]):
                    continue  # the fitted USL is not positive there (it bends through zero)
                rows.append(_prediction_row(base, "extrapolate", method, float(xa), float(value[i]),
                                            float(low[i]), float(high[i]), int(len(xv)), float(top), note))
            if np.unique(xv[held]).size < minimum or held.sum() < minimum:
                continue
            try:
                value, low, high = fit_and_predict(xv[held], yv[held], np.array([top]))
            except ValueError:
                continue
            if not np.isfinite(low[0]):
                continue
            row = _prediction_row(base, "backtest", method, float(top), float(value[0]), float(low[0]),
                                  float(high[0]), int(held.sum()), float(xv[held].max()), note)
            row.update(measured=measured, error=float(value[0]) / measured - 1,
                       within_interval=bool(low[0] <= measured <= high[0]))
            rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *PREDICTION_COLUMNS])


def default_predictions(runs: pd.DataFrame, confidence: float = 0.95, factors: Sequence[float] = (2, 4)
                        ) -> pd.DataFrame:
    """``predict_table`` of tokens_per_s and step_time_s against n_devices per devices-family group."""
    rows = prepare_rows(runs)
    ys = [y for y in ("tokens_per_s", "step_time_s") if (numeric_column(rows, y) > 0).any()]
    if "n_devices" not in rows.columns or not ys:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    frame, by = family_frame(rows, ("n_devices",))
    return predict_table(frame, "n_devices", ys, by, confidence, factors)


# ------------------------------------------------------------------ plan against measurement


PLAN_COLUMNS = ("plan_source", "size_name", "strategy", "n_devices", "mesh_shape", "d_model", "n_layers", "n_heads",
                "d_ff", "seq_len", "vocab", "global_batch", "remat", "xla_flags", "measured_device_kind",
                "predicted_step_time_s", "step_time_s", "step_time_ratio", "plan_compiled_total_bytes",
                "measured_compiled_total_bytes", "compiled_ratio", "peak_bytes_in_use", "memory_ratio", "note")


def plan_vs_measured(runs: pd.DataFrame) -> pd.DataFrame:
    """Join planned rows (row_source ``planned:<target>``) with measured rows of the same grid point.

    Points are matched on records.MATCH_COLUMNS, the point key and its labels
    (a bfloat16 plan never stands in for a float32 run, nor a scanned one for unrolled layers). Ratios:
    step_time_ratio = predicted_step_time_s / step_time_s; compiled_ratio = the
    plan's compiled_total_bytes / the measured run's; memory_ratio = the plan's
    compiled_total_bytes / the measured peak_bytes_in_use (empty where the
    backend keeps no allocator statistics, such as the CPU).

    Returns:
      ``PLAN_COLUMNS``, one row per matched (plan, point); empty without both kinds of rows.
    """
    if "row_source" not in runs.columns:
        return pd.DataFrame(columns=list(PLAN_COLUMNS))
    source = runs["row_source"].fillna("measured").astype(str)
    planned = runs[source.str.startswith("planned") & succeeded(runs)]
    measured = runs[(source == "measured") & succeeded(runs)]
    if planned.empty or measured.empty:
        return pd.DataFrame(columns=list(PLAN_COLUMNS))
    keys = [c for c in MATCH_COLUMNS if c in runs.columns]

    def normalised(frame):
        out = frame.copy()
        for c in keys:
            out[c] = out[c].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        return out

    right = normalised(measured)
    numeric = ["step_time_s", "compiled_total_bytes", "peak_bytes_in_use"]
    for c in numeric:
        right[c] = numeric_column(right, c)
    right = right.groupby(keys, sort=False).agg(
        {**{c: "median" for c in numeric}, **({"device_kind": "first"} if "device_kind" in right.columns else {})})
    right = right.rename(columns={"compiled_total_bytes": "measured_compiled_total_bytes",
                                  "device_kind": "measured_device_kind"}).reset_index()
    left = normalised(planned)
    left["plan_source"] = left["row_source"]
    left["predicted_step_time_s"] = numeric_column(left, "predicted_step_time_s")
    left["plan_compiled_total_bytes"] = numeric_column(left, "compiled_total_bytes")
    joined = left[["plan_source", *keys, "predicted_step_time_s", "plan_compiled_total_bytes"]].merge(
        right, on=keys, how="inner")
    if joined.empty:
        return pd.DataFrame(columns=list(PLAN_COLUMNS))
    joined["step_time_ratio"] = joined["predicted_step_time_s"] / joined["step_time_s"]
    joined["compiled_ratio"] = joined["plan_compiled_total_bytes"] / joined["measured_compiled_total_bytes"]
    peak = joined["peak_bytes_in_use"].where(joined["peak_bytes_in_use"] > 0)
    joined["memory_ratio"] = joined["plan_compiled_total_bytes"] / peak
    joined["note"] = np.where(peak.isna(), "no runtime peak in the measured row (the backend keeps no allocator "
                                           "statistics)", "")
    for c in PLAN_COLUMNS:
        if c not in joined.columns:
            joined[c] = np.nan
    for c in ("n_devices", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab", "global_batch"):
        joined[c] = pd.to_numeric(joined[c], errors="coerce")
    return joined[list(PLAN_COLUMNS)].reset_index(drop=True)


# ------------------------------------------------------------------ expectations


_EXPECTATION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*([A-Za-z_][\w.]*)\s*=\s*(\S+)\s*$")


def parse_expectation(text: str) -> tuple[str, str, float]:
    """Parse ``"Y:X=B"`` (e.g. ``"step_time_s:params=1.5"``) into (y, x, b).

    Raises:
      ValueError: text not of that form, or B not a finite number.
    """
    match = _EXPECTATION.match(text)
    if not match:
        raise ValueError(f"expected Y:X=EXPONENT, for example step_time_s:params=1.5; got {text!r}")
    y, x, raw = match.groups()
    try:
        b = float(raw)
    except ValueError:
        raise ValueError(f"exponent {raw!r} in {text!r} is not a number") from None
    if not math.isfinite(b):
        raise ValueError(f"exponent in {text!r} must be finite, got {raw}")
    return y, x, b


def check_expectation(data: pd.DataFrame, y: str, x: str, exponent: float, by: Sequence[str] | None = None,
                      confidence: float = 0.95, tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """Per group, is y ∝ x^exponent, within the tolerance?

    ``assessment`` grades the interval against exponent ± tolerance as
    ``grade`` does: 'as expected' (inside), 'above expected' / 'below expected'
    (wholly outside on one side), 'inconclusive' (note says why). ``rejected`` is
    the plain t test: the claim lies outside the interval at ``confidence``.

    Args:
      data: raw rows (fitted here with ``fit_table``), or a fits table (a frame
        with an ``exponent`` column), whose rows with this y and x are tested.
      y, x: the columns of the claim.
      exponent: the claimed exponent.
      by: group columns when fitting raw rows; None → for jaxscale rows the
        family grouping of x (``family_frame``), else none. Ignored for a fits table.
      confidence: level of the test.
      tolerance: half-width of the band around the claim.

    Returns:
      The fits' group columns and family (when present), then y, x,
      claimed_exponent, exponent, stderr, ci_low, ci_high, confidence, tolerance,
      t_stat, p_value, rejected (True/False, None without a fit), assessment,
      n_points, note.
    """
    check_confidence(confidence)
    check_tolerance(tolerance)
    if "exponent" in data.columns:
        fits = data[(data["y"] == y) & (data["x"] == x)]
    else:
        data = prepare_rows(data) if y in (MEMORY_COLUMN, STATE_COLUMN, ACTIVATION_COLUMN) else data
        if by is None:
            data, by = family_frame(data, (x,)) if x in data.columns else (data, ())
        fits = fit_table(data, x, y, by, confidence=confidence, tolerance=tolerance)
    stat_cols = set(FIT_COLUMNS) - {"by"}
    keep = [c for c in fits.columns if c not in stat_cols]
    rows = []
    words = {"as ideal": "as expected", "above ideal": "above expected", "below ideal": "below expected",
             "inconclusive": "inconclusive"}
    for _, fit in fits.iterrows():
        row = {**{c: fit[c] for c in keep}, "y": y, "x": x, "claimed_exponent": exponent, "confidence": confidence,
               "tolerance": tolerance, "n_points": fit["n_points"], "rejected": None, "assessment": "inconclusive",
               "note": fit["note"] if isinstance(fit["note"], str) and fit["note"].startswith(("no fit", "too few"))
               else ""}
        if pd.notna(fit["exponent"]):
            dof = int(fit["n_points"]) - 2
            half = t_critical(confidence, dof) * float(fit["stderr"])
            low, high = float(fit["exponent"]) - half, float(fit["exponent"]) + half
            t, p = t_test(float(fit["exponent"]), float(fit["stderr"]), dof, exponent)
            verdict = grade(low, high, exponent, tolerance, "")
            row.update(exponent=fit["exponent"], stderr=fit["stderr"], ci_low=low, ci_high=high, t_stat=t,
                       p_value=p, rejected=bool(p < 1 - confidence), assessment=words[verdict.assessment],
                       note=verdict.reason)
        rows.append(row)
    if not rows:
        rows.append({"y": y, "x": x, "claimed_exponent": exponent, "confidence": confidence, "tolerance": tolerance,
                     "rejected": None, "assessment": "inconclusive",
                     "note": f"no fit of {y} against {x} in the fits table"})
    return pd.DataFrame(rows, columns=[*keep, "y", "x", "claimed_exponent", "exponent", "stderr", "ci_low",
                                       "ci_high", "confidence", "tolerance", "t_stat", "p_value", "rejected",
                                       "assessment", "n_points", "note"])


# ------------------------------------------------------------------ the analysis


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no single truth value to compare by
class Analysis:
    """Every table of one analysis of rows (``analyze_rows``), for report.write_analysis.

    Attributes:
      fits: ``default_fits``, or ``powerlaw.fit_table`` in the custom pipeline.
      efficiency, joint: ``scaling_efficiency`` and ``default_joint_fit`` (None in the custom pipeline).
      usl, predictions: ``usl.default_usl`` and ``default_predictions``, or ``usl.usl_table`` and ``predict_table``.
      plan: ``plan_vs_measured`` (None when it is empty, and in the custom pipeline).
      expectations: ``check_expectation`` of every expectation, one frame (None without expectations).
      unusable: per fitted column, the successful rows whose value a log-log fit cannot use (``unusable_values``).
      confidence, tolerance: the level of the intervals and the half-width of the band around each ideal.
    """

    fits: pd.DataFrame
    efficiency: pd.DataFrame | None
    joint: pd.DataFrame | None
    usl: pd.DataFrame | None
    predictions: pd.DataFrame | None
    plan: pd.DataFrame | None
    expectations: pd.DataFrame | None
    unusable: dict[str, int]
    confidence: float
    tolerance: float


def analyze_rows(rows: pd.DataFrame, *, x: str | None = None, ys: str | Sequence[str] = (), by: Sequence[str] = (),
                 ideal: float | IdealFn | None = None, directions: dict[str, str] | None = None,
                 expectations: Sequence[str] = (), confidence: float = 0.95,
                 tolerance: float = DEFAULT_TOLERANCE) -> Analysis:
    """The analysis of rows: jaxscale's default pipeline, or with ``x`` and ``ys`` the fits of any table's columns.

    Every table is computed before this returns, so a ValueError leaves nothing half done.

    Args:
      rows: runs.csv rows, or (custom pipeline) any table with numeric x and y columns.
      x, ys: the custom pipeline's x and y columns, given together: ``powerlaw.fit_table``, ``usl.usl_table`` and
        ``predict_table`` of ys against x. Without them: ``default_fits``, ``scaling_efficiency``,
        ``default_joint_fit``, ``usl.default_usl``, ``default_predictions`` and ``plan_vs_measured``.
      by, ideal, directions: the custom pipeline's group columns, ideal exponent and better directions (see
        ``powerlaw.fit_table``); the default pipeline ignores them.
      expectations: claims ``"Y:X=B"`` (``parse_expectation``), each checked with ``check_expectation``.
      confidence, tolerance: the level of the intervals and the half-width of the band around each ideal.

    Raises:
      ValueError: x without ys or ys without x, a bad confidence, tolerance or expectation, or rows that
        cannot share a fit (see ``family_frame``).
    """
    ys = (ys,) if isinstance(ys, str) else tuple(ys)
    if bool(x) != bool(ys):
        raise ValueError("--x and --y go together: --x COL --y COL [--y COL ...]")
    check_confidence(confidence)
    check_tolerance(tolerance)
    claims = [parse_expectation(text) for text in expectations]
    efficiency = joint = plan = None
    if x:
        fits = fit_table(rows, x, ys, by=by, ideal=ideal, confidence=confidence, tolerance=tolerance,
                         directions=directions)
        usl = usl_table(rows, x, ys, by=by, confidence=confidence, directions=directions)
        predictions = predict_table(rows, x, ys, by=by, confidence=confidence, directions=directions)
        checks = [check_expectation(rows, y=cy, x=cx, exponent=b, by=by or None, confidence=confidence,
                                    tolerance=tolerance) for cy, cx, b in claims]
        fitted = (x, *ys)
    else:
        fits = default_fits(rows, confidence=confidence, tolerance=tolerance)
        efficiency = scaling_efficiency(rows)
        joint = default_joint_fit(rows, confidence=confidence, tolerance=tolerance)
        usl = default_usl(rows, confidence=confidence)
        predictions = default_predictions(rows, confidence=confidence)
        plan = plan_vs_measured(rows)
        checks = [check_expectation(rows, y=cy, x=cx, exponent=b, confidence=confidence, tolerance=tolerance)
                  for cy, cx, b in claims]
        fitted = DEFAULT_COLUMNS
    return Analysis(fits=fits, efficiency=efficiency, joint=joint, usl=usl, predictions=predictions,
                    plan=plan if plan is not None and len(plan) else None,
                    expectations=pd.concat(checks, ignore_index=True) if checks else None,
                    unusable=unusable_values(rows, fitted), confidence=confidence, tolerance=tolerance)
