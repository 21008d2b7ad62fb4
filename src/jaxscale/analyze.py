"""Rows → fits: power laws with t intervals and verdicts, USL knees, predictions, joint fits, efficiency.

Everything here is a pure function of DataFrames and arrays; nothing prints or
touches files (report.py formats what these return). Power-law fits are
ordinary least squares on (log x, log y), so the noise model is multiplicative:
a step that is 10% slower counts the same at 1 ms as at 1 s.

Verdicts. An exponent is graded against its ideal with a practical tolerance
(``DEFAULT_TOLERANCE``): ``as ideal`` when the whole interval lies inside
ideal ± tolerance, ``better than ideal`` / ``worse than ideal`` when it lies
wholly outside on one side, ``inconclusive`` otherwise (the note says why).
``regime`` uses the speed-up convention for every quantity: ``superlinear`` is
better than ideal, ``sublinear`` worse, ``linear`` as ideal, so the step time and
the throughput of the same points always get the same word. A quantity with no
better direction (``direction`` empty) is read as if higher were better, and
its assessment says ``above ideal`` / ``below ideal``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from jaxscale.records import COLLECTIVE_COLUMNS, SUCCESS_STATUSES

DEFAULT_TOLERANCE = 0.05
MEMORY_COLUMN = "memory_per_device_bytes"
STATE_COLUMN = "state_bytes"
ACTIVATION_COLUMN = "activation_bytes"
SIZE_COLUMNS = ("size_name", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab")
# y columns where a larger value is better; costs (time, bytes) are named by their suffix.
HIGHER_IS_BETTER = frozenset({"tokens_per_s", "mfu", "hfu", "achieved_tflops_per_device", "efficiency",
                              "predicted_mfu"})
SHARDED_STRATEGIES = ("fsdp", "tp", "fsdp_tp")
BATCH_SPLITTING_STRATEGIES = ("dp", "fsdp", "fsdp_tp")
# Quantities that measure speed: on devices that share one host's cores they cannot scale.
SPEED_COLUMNS = ("step_time_s", "tokens_per_s")
SHARED_HOST_NOTE = "devices share one host's cores (backend cpu): no strong- or weak-scaling speed-up is possible"

# Columns of runs.csv that say how a point was run. Rows that differ in any of
# them never share a fit: each family is split by every one of them that is not
# its x or tied to its x (X_LINKED).
CONFIG_COLUMNS = ("row_source", "backend", "device_kind", "n_processes", "jax_version", "jaxlib_version",
                  "flax_version", "libtpu_version", *SIZE_COLUMNS, "params", "strategy", "n_devices", "mesh_shape",
                  "model_axis", "hosts", "batch_mode", "global_batch", "per_device_batch", "tokens_per_step", "dtype",
                  "remat", "attention", "attention_impl", "scan_layers", "xla_flags", "isolation", "attention_flops",
                  "topology")
# Columns that follow x within a family; they must take one value per x (else the analyzer refuses).
X_LINKED = {
    "n_devices": ("mesh_shape", "hosts"),
    "params": ("size_name", "d_model", "n_layers", "n_heads", "d_ff", "vocab"),
    "tokens_per_step": ("global_batch", "per_device_batch"),
}
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
# Slack when comparing interval ends with band edges, so an exact fit that lands
# 1e-16 off the ideal still counts as inside.
_EDGE_EPS = 1e-9

IdealFn = Callable[[dict, str, str], "float | None"]

FIT_COLUMNS = ("by", "x", "y", "exponent", "stderr", "ci_low", "ci_high", "coefficient", "r2", "residual_std",
               "n_points", "n_dropped", "dof", "confidence", "ideal_exponent", "tolerance", "direction",
               "assessment", "regime", "curvature", "slope_change", "curvature_p", "note", "log_x_mean", "x_min",
               "x_max")
USL_COLUMNS = ("by", "x", "y", "model", "lambda_", "sigma", "sigma_ci_low", "sigma_ci_high", "kappa", "kappa_ci_low",
               "kappa_ci_high", "peak_n", "peak_y", "residual_std", "n_points", "n_x_values", "dof", "confidence",
               "note")
PREDICTION_COLUMNS = ("by", "kind", "method", "y", "x", "x_value", "predicted", "pi_low", "pi_high", "confidence",
                      "measured", "error", "within_interval", "x_max_fitted", "n_points", "note")


# ------------------------------------------------------------------ power law


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """y = coefficient · x**exponent, fitted by least squares on (log x, log y).

    Attributes:
      exponent, coefficient: b and a.
      stderr: standard error of b.
      ci_low, ci_high: the two-sided t interval for b at ``confidence`` (n − 2 dof).
      r2: coefficient of determination in log space (NaN when log y is constant).
      n, dof: points used and residual degrees of freedom (n − 2).
      residual_std: sqrt(SSE / dof) of the log residuals, the σ the intervals use.
      log_x_mean, x_min, x_max: where the data sit, for bands and plot ranges.
    """

    exponent: float
    coefficient: float
    stderr: float
    ci_low: float
    ci_high: float
    r2: float
    n: int
    residual_std: float
    dof: int
    confidence: float
    log_x_mean: float
    x_min: float
    x_max: float

    def predict(self, x) -> np.ndarray:
        """The fitted y at x."""
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent

    def _band(self, x, extra: float) -> tuple[np.ndarray, np.ndarray]:
        lx = np.log(np.asarray(x, dtype=float))
        se = np.sqrt(self.residual_std ** 2 * (extra + 1 / self.n) + (self.stderr * (lx - self.log_x_mean)) ** 2)
        center = math.log(self.coefficient) + self.exponent * lx
        t = _t_crit(self.confidence, self.dof)
        return np.exp(center - t * se), np.exp(center + t * se)

    def mean_band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Confidence band (at ``confidence``) of the fitted mean of log y at x, mapped back to y.

        Var(fit at log x) = σ²/n + stderr²·(log x − mean log x)², narrowest at the data's centre.
        """
        return self._band(x, 0.0)

    def prediction_interval(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Prediction interval (at ``confidence``) of one new observation at x.

        Var(new log y − fit) = σ²·(1 + 1/n) + stderr²·(log x − mean log x)².
        """
        return self._band(x, 1.0)

    @classmethod
    def from_row(cls, row) -> PowerLawFit:
        """Rebuild a fit from a row of ``fit_table`` (a dict or a pandas Series)."""
        values = {f.name: float(row["n_points" if f.name == "n" else f.name]) for f in dataclasses.fields(cls)}
        return cls(**{**values, "n": int(values["n"]), "dof": int(values["dof"])})


def _t_crit(confidence: float, dof: int) -> float:
    from scipy import stats  # scipy loads in about a second: only where a fit needs it

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def _t_test(estimate: float, stderr: float, dof: int, claimed: float) -> tuple[float, float]:
    diff = estimate - claimed
    if stderr == 0:
        # An exact fit: the claim either matches to rounding or is rejected outright.
        return (0.0, 1.0) if abs(diff) <= _EDGE_EPS else (math.copysign(math.inf, diff), 0.0)
    from scipy import stats

    t = diff / stderr
    return float(t), float(2 * stats.t.sf(abs(t), dof))


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def _check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")


def _validate_xy(xa: np.ndarray, ya: np.ndarray, minimum: int, what: str) -> None:
    if xa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"x and y must be 1-D, got shapes {xa.shape} and {ya.shape}")
    if len(xa) != len(ya):
        raise ValueError(f"x and y have different lengths: {len(xa)} and {len(ya)}")
    if len(xa) < minimum:
        raise ValueError(f"need at least {minimum} points for {what}, got {len(xa)}")
    for name, values in (("x", xa), ("y", ya)):
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            raise ValueError(f"{name} must be positive and finite for a log-log fit; "
                             f"bad values at positions {np.flatnonzero(bad).tolist()}: {values[bad].tolist()}")


def fit_power_law(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> PowerLawFit:
    """Fit y = a·x^b by ordinary least squares on (log x, log y).

    Args:
      x, y: equal-length sequences of positive, finite numbers; at least 3 points
        and at least 2 distinct x.
      confidence: level of the t interval for b, in (0, 1).

    Returns:
      A PowerLawFit. With exactly-fitting data stderr is 0 and the interval is a point.

    Raises:
      ValueError: mismatched lengths, fewer than 3 points, non-positive or
        non-finite values, a single distinct x, or a confidence outside (0, 1).
    """
    _check_confidence(confidence)
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _validate_xy(xa, ya, 3, "a power-law fit with an interval")
    if np.unique(xa).size < 2:
        raise ValueError(f"x takes a single distinct value ({xa[0]:g}); the exponent is undetermined")

    lx, ly = np.log(xa), np.log(ya)
    n, dof = len(lx), len(lx) - 2
    dx, dy = lx - lx.mean(), ly - ly.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ dy) / sxx
    intercept = float(ly.mean() - slope * lx.mean())
    resid = ly - (intercept + slope * lx)
    sse, sst = float(resid @ resid), float(dy @ dy)
    sigma = math.sqrt(sse / dof)
    stderr = sigma / math.sqrt(sxx)
    half = _t_crit(confidence, dof) * stderr
    return PowerLawFit(exponent=slope, coefficient=math.exp(intercept), stderr=stderr, ci_low=slope - half,
                       ci_high=slope + half, r2=1 - sse / sst if sst > 0 else math.nan, n=n, residual_std=sigma,
                       dof=dof, confidence=confidence, log_x_mean=float(lx.mean()), x_min=float(xa.min()),
                       x_max=float(xa.max()))


@dataclasses.dataclass(frozen=True)
class Curvature:
    """The bend of log y against log x: log y = c0 + c1·u + c2·u², u = log x − mean log x.

    Attributes:
      quadratic: c2; stderr and p_value of its two-sided t test (n − 3 dof).
      slope_change: how much the local exponent (d log y / d log x = c1 + 2·c2·u)
        changes across the measured range, 2·c2·(log x_max − log x_min).
      label: 'concave' (c2 < 0) or 'convex' (c2 > 0) when c2 is significant at
        ``confidence`` and |slope_change| exceeds ``tolerance``; else ''.
    """

    quadratic: float
    stderr: float
    p_value: float
    slope_change: float
    label: str


def curvature_test(x: Sequence[float], y: Sequence[float], confidence: float = 0.95,
                   tolerance: float = DEFAULT_TOLERANCE) -> Curvature:
    """Does a power law bend? A quadratic term in log-log, tested at ``confidence``.

    The bend counts only when it is both significant (two-sided t test of the
    quadratic coefficient, n − 3 dof, p < 1 − confidence) and practical: the
    local exponent changes by more than ``tolerance`` across the measured x.

    Raises:
      ValueError: fewer than 4 points or fewer than 3 distinct x, or bad values.
    """
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    _validate_xy(xa, ya, 4, "a curvature test")
    if np.unique(xa).size < 3:
        raise ValueError(f"need at least 3 distinct x for a curvature test, got {np.unique(xa).size}")
    lx, ly = np.log(xa), np.log(ya)
    u = lx - lx.mean()
    design = np.column_stack([np.ones_like(u), u, u * u])
    coef, *_ = np.linalg.lstsq(design, ly, rcond=None)
    resid = ly - design @ coef
    dof = len(u) - 3
    sigma2 = float(resid @ resid) / dof if dof > 0 else math.nan
    se = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[2, 2]) if dof > 0 else math.nan
    c2 = float(coef[2])
    change = 2 * c2 * float(lx.max() - lx.min())
    if dof <= 0 or not math.isfinite(se):
        p = math.nan
    elif se == 0:
        p = 0.0 if abs(change) > tolerance else 1.0
    else:
        from scipy import stats

        p = float(2 * stats.t.sf(abs(c2) / se, dof))
    significant = math.isfinite(p) and p < 1 - confidence and abs(change) > tolerance
    return Curvature(quadratic=c2, stderr=se, p_value=p, slope_change=change,
                     label=("concave" if c2 < 0 else "convex") if significant else "")


# ------------------------------------------------------------------ verdicts


def direction_of(y: str) -> str:
    """'higher' when a larger y is better, 'lower' for costs (``*_s`` times, ``*_bytes``), '' when neither."""
    if y in HIGHER_IS_BETTER or y.endswith("_per_s"):
        return "higher"
    if y.endswith("_s") or y.endswith("_bytes"):
        return "lower"
    return ""


_DIRECTION_TEXT = {"higher": "higher is better", "lower": "lower is better", "": ""}


@dataclasses.dataclass(frozen=True)
class Verdict:
    """An exponent interval graded against an ideal ± tolerance.

    Attributes:
      assessment: 'as ideal', 'better than ideal', 'worse than ideal' ('above
        ideal' / 'below ideal' when y has no better direction), 'inconclusive',
        or '' when there is no ideal.
      regime: speed-up convention: 'superlinear' (better than ideal, or above it
        without a direction), 'linear', 'sublinear'; '' when inconclusive.
      reason: why a verdict is inconclusive ('' otherwise).
    """

    assessment: str
    regime: str
    reason: str


def grade(ci_low: float, ci_high: float, ideal: float | None, tolerance: float = DEFAULT_TOLERANCE,
          direction: str = "") -> Verdict:
    """Grade the interval [ci_low, ci_high] of an exponent against ideal ± tolerance.

    Args:
      ci_low, ci_high: the exponent's interval (NaN: no fit).
      ideal: the ideal exponent; None or NaN means none (empty verdict).
      tolerance: half-width of the band of practically ideal exponents.
      direction: 'higher' (a larger y is better), 'lower' (a cost), or ''.

    Returns:
      A Verdict (see its attributes).
    """
    if ideal is None or not np.isfinite(ideal):
        return Verdict("", "", "")
    if any(v is None or not np.isfinite(v) for v in (ci_low, ci_high)):
        return Verdict("inconclusive", "", "no fit")
    low_edge, high_edge = ideal - tolerance, ideal + tolerance
    if ci_low >= low_edge - _EDGE_EPS and ci_high <= high_edge + _EDGE_EPS:
        return Verdict("as ideal", "linear", "")
    if ci_high < low_edge - _EDGE_EPS or ci_low > high_edge + _EDGE_EPS:
        above = ci_low > high_edge
        if not direction:
            return Verdict("above ideal" if above else "below ideal", "superlinear" if above else "sublinear", "")
        better = above == (direction == "higher")
        return Verdict("better than ideal" if better else "worse than ideal",
                       "superlinear" if better else "sublinear", "")
    width = ci_high - ci_low
    if width > 2 * tolerance:
        why = f"interval width {width:.3f} is wider than the band ({ideal:g} ± {tolerance:g})"
    else:
        why = f"interval [{ci_low:+.3f}, {ci_high:+.3f}] straddles an edge of the band {ideal:g} ± {tolerance:g}"
    return Verdict("inconclusive", "", why)


def classify_regime(ci_low: float, ci_high: float, ideal: float | None, tolerance: float = DEFAULT_TOLERANCE,
                    direction: str = "") -> str:
    """The regime word of ``grade`` ('' without an ideal, or when inconclusive)."""
    return grade(ci_low, ci_high, ideal, tolerance, direction).regime


def _join_notes(*notes: str) -> str:
    return "; ".join(n for n in dict.fromkeys(notes) if n)


# ------------------------------------------------------------------ rows and groups


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def _status_ok(df: pd.DataFrame) -> pd.Series:
    if "status" not in df.columns:
        return pd.Series(True, index=df.index)
    return df["status"].astype(str).str.strip().isin(SUCCESS_STATUSES)


def _usable(df: pd.DataFrame, columns: Iterable[str]) -> pd.Series:
    """Rows with a success status (records.SUCCESS_STATUSES, when there is a status column)
    and positive, finite values in ``columns``."""
    mask = _status_ok(df)
    for column in columns:
        values = _numeric(df, column)
        mask &= np.isfinite(values) & (values > 0)
    return mask


def _group_positions(df: pd.DataFrame, by: Sequence[str]) -> list[tuple[dict, np.ndarray]]:
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


def _groups(df: pd.DataFrame, by: Sequence[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    for key, positions in _group_positions(df, by):
        yield key, df.iloc[positions]


def _positive(values: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values > 0)


def _require(df: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise ValueError(f"columns not found: {missing}; available: {list(df.columns)}")


def _ideal_fn(ideal: float | IdealFn | None) -> IdealFn:
    if callable(ideal):
        return ideal
    value = 1.0 if ideal is None else float(ideal)
    return lambda key, x, y: value


# The x and y columns of the default fits a row must hold a positive, finite value in to count.
DEFAULT_COLUMNS = ("n_devices", "params", "tokens_per_step", "step_time_s", "tokens_per_s", "predicted_step_time_s")


def unusable_values(df: pd.DataFrame, columns: Iterable[str]) -> dict[str, int]:
    """Per column, the rows with a success status whose value a log-log fit cannot use: zero, negative or infinite.

    Empty cells are missing, not counted; rows that failed are left out of
    every fit anyway and not counted either.
    """
    ok = _status_ok(df)
    out = {}
    for column in dict.fromkeys(columns):
        if column not in df.columns:
            continue
        values = _numeric(df, column)[ok]
        bad = int((np.isinf(values) | (values <= 0)).sum())
        if bad:
            out[column] = bad
    return out


def succeeded(df: pd.DataFrame) -> pd.Series:
    """Which rows have a success status (records.SUCCESS_STATUSES; every row of a CSV without a status column)."""
    return _status_ok(df)


def why_no_fits(df: pd.DataFrame) -> str:
    """Why rows give no default fit, in one sentence (for a fits table that came back empty)."""
    if df.empty:
        return "there are no rows"
    ok = _status_ok(df)
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
    peak, compiled = _numeric(df, "peak_bytes_in_use"), _numeric(df, "compiled_total_bytes")
    has_peak = np.isfinite(peak) & (peak > 0)
    memory = peak.where(has_peak, compiled)
    out[MEMORY_COLUMN] = memory
    out["memory_source"] = np.where(has_peak, "peak_bytes_in_use",
                                    np.where(np.isfinite(compiled), "compiled_total_bytes", ""))
    state = _numeric(df, "param_bytes") + _numeric(df, "opt_state_bytes")
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
        out["per_device_batch"] = (_numeric(out, "global_batch") / _numeric(out, "n_devices")).where(weak)
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
                    frame[column] = _numeric(frame, column).where(~weak)
    by = tuple(c for c in CONFIG_COLUMNS if c in frame.columns and c not in xs and c not in linked)
    tied = [c for c in linked if c in frame.columns and c not in by]
    if tied and len(xs) == 1 and xs[0] in frame.columns and len(frame):
        x = xs[0]
        counts = frame.assign(_x=_numeric(frame, x)).groupby([*by, "_x"], sort=False, dropna=False)[tied].nunique(
            dropna=False)
        bad = counts[(counts > 1).any(axis=1)]
        if len(bad):
            key = bad.index[0] if isinstance(bad.index[0], tuple) else (bad.index[0],)
            column = next(c for c in tied if bad.iloc[0][c] > 1)
            at = key[-1]
            where = dict(zip(by, key[:-1]))
            sel = _numeric(frame, x) == at
            for c, v in where.items():
                sel &= frame[c].isna() if pd.isna(v) else frame[c] == v
            seen = frame.loc[sel, column].drop_duplicates().tolist()[:2]
            label = ", ".join(f"{k}={v}" for k, v in where.items() if pd.notna(v)) or "all rows"
            raise ValueError(f"column {column!r} takes the values {seen[0]!r} and {seen[1]!r} at {x}={at:g} "
                             f"within one group ({label}); rows that differ in {column} cannot share a fit: "
                             f"analyze them separately or remove one set")
    return frame, by


# ------------------------------------------------------------------ fit tables


def _fit_row(key: dict, by: Sequence[str], x: str, y: str, xv: pd.Series, yv: pd.Series, n_dropped: int,
             ideal: float | None, confidence: float, tolerance: float, direction: str) -> dict:
    row = {**key, "by": ",".join(by), "x": x, "y": y, "n_points": int(len(xv)), "n_dropped": int(n_dropped),
           "confidence": confidence, "tolerance": tolerance, "direction": _DIRECTION_TEXT[direction],
           "ideal_exponent": math.nan if ideal is None else float(ideal), "regime": "", "assessment": "",
           "curvature": "", "note": ""}
    try:
        fit = fit_power_law(xv, yv, confidence)
    except ValueError as err:
        row["note"] = f"no fit: {err}"
        if ideal is not None:
            row["assessment"] = "inconclusive"
            row["note"] = f"too few points: {err}" if len(xv) < 3 else row["note"]
        return row
    row.update({f.name: getattr(fit, f.name) for f in dataclasses.fields(fit) if f.name != "n"})
    verdict = grade(fit.ci_low, fit.ci_high, ideal, tolerance, direction)
    row.update(assessment=verdict.assessment, regime=verdict.regime, note=verdict.reason)
    if fit.dof == 1 and verdict.assessment == "inconclusive":
        row["note"] = _join_notes("too few points (3: 1 degree of freedom)", row["note"])
    try:
        bend = curvature_test(xv, yv, confidence, tolerance)
    except ValueError:
        pass
    else:
        row.update(curvature=bend.label, slope_change=bend.slope_change, curvature_p=bend.p_value)
        if bend.label:
            row["note"] = _join_notes(row["note"], f"{bend.label}: the local exponent changes by "
                                                   f"{bend.slope_change:+.2f} across the range, so b is an average")
    return row


def fit_table(df: pd.DataFrame, x: str, ys: str | Sequence[str], by: Sequence[str] = (),
              ideal: float | IdealFn | None = None, confidence: float = 0.95, tolerance: float = DEFAULT_TOLERANCE,
              directions: dict[str, str] | None = None) -> pd.DataFrame:
    """Fit each y against x within every group of the ``by`` columns, and grade each exponent.

    Rows whose ``status`` (if the column exists) is not a success status, or whose
    x or y is missing or non-positive, are left out and counted in ``n_dropped``.
    A group with fewer than 3 usable points or a single distinct x gets a row with
    no exponent and a ``note`` saying why.

    Args:
      df: the rows; x and y values may be strings (coerced to numbers).
      x: the column to use as x.
      ys: one y column or several.
      by: group columns.
      ideal: the exponent each fit is compared with: None → 1, a number, or
        ``ideal(group_key_dict, x, y) -> float | None``; a None from the callable
        means there is no ideal, and the verdict is left empty.
      confidence: level of the exponent intervals and of the curvature test.
      tolerance: half-width of the band around the ideal (see ``grade``).
      directions: y → 'higher' / 'lower' / '' to override ``direction_of``.

    Returns:
      One row per (group, y): the ``by`` columns, then ``FIT_COLUMNS``: by (the
      group columns, comma-joined), x, y, exponent, stderr, ci_low, ci_high,
      coefficient, r2, residual_std, n_points, n_dropped, dof, confidence,
      ideal_exponent, tolerance, direction ('higher is better', 'lower is
      better' or ''), assessment, regime (see ``grade``), curvature ('concave',
      'convex' or '', see ``curvature_test``), slope_change, curvature_p, note,
      log_x_mean, x_min, x_max.
    """
    ys = (ys,) if isinstance(ys, str) else tuple(ys)
    by = tuple(by)
    _check_confidence(confidence)
    _check_tolerance(tolerance)
    _require(df, (x, *by, *ys))
    ideal_of = _ideal_fn(ideal)
    directions = directions or {}
    ok = _status_ok(df).to_numpy()
    xs_all = _numeric(df, x).to_numpy()
    ys_all = {y: _numeric(df, y).to_numpy() for y in ys}
    rows = []
    for key, positions in _group_positions(df, by):
        xg = xs_all[positions]
        for y in ys:
            yg = ys_all[y][positions]
            mask = ok[positions] & _positive(xg) & _positive(yg)
            rows.append(_fit_row(key, by, x, y, xg[mask], yg[mask], int((~mask).sum()), ideal_of(key, x, y),
                                 confidence, tolerance, directions.get(y, direction_of(y))))
    return pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])


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


def _shared_host(key: dict) -> bool:
    source = key.get("row_source")
    measured = source is None or (isinstance(source, float) and math.isnan(source)) or source == "measured"
    return measured and str(key.get("backend", "")).lower() == "cpu"


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
    present = [y for y in family.ys if (_numeric(rows, y) > 0).any()]
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
    ok = _status_ok(frame).to_numpy()
    positions_by_group = [positions for _, positions in _group_positions(frame, by)]
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
        if family.x == "n_devices" and r["y"] in SPEED_COLUMNS and _shared_host(key) and pd.notna(
                r["ideal_exponent"]):
            part.loc[i, ["assessment", "regime"]] = ["not applicable", ""]
            part.at[i, "note"] = _join_notes(SHARED_HOST_NOTE, r["note"] if r["assessment"] != "inconclusive"
                                             else "")
        elif family.x == "n_devices" and pd.isna(r["ideal_exponent"]) and _why_no_ideal(key, r["y"]):
            part.at[i, "note"] = _join_notes(_why_no_ideal(key, r["y"]), r["note"])
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


def joint_fit(df: pd.DataFrame, y: str, xs: Sequence[str] = ("params", "n_devices"),
              by: Sequence[str] = ("strategy",), confidence: float = 0.95, ideals: IdealFn | None = None,
              tolerance: float = DEFAULT_TOLERANCE) -> pd.DataFrame:
    """Fit log y = log a + Σ b_i log x_i by least squares within each group.

    Args:
      df: the rows (status and missing values handled as in ``fit_table``).
      y: the y column.
      xs: the x columns.
      by: group columns.
      confidence: level of the t intervals (n − len(xs) − 1 dof).
      ideals: ``ideals(group_key, x, y) -> float | None``, the ideal of each b_x,
        graded as in ``fit_table``; None: no verdicts.
      tolerance: half-width of the band around each ideal.

    Returns:
      One row per group: the ``by`` columns, by, y, xs (comma-joined), coefficient,
      for each x: exponent_<x>, stderr_<x>, ci_low_<x>, ci_high_<x>, ideal_<x>,
      assessment_<x>; then r2, residual_std, n_points, n_dropped, dof, confidence,
      tolerance, note. Too few points or a rank-deficient design (an x with one
      distinct value, or collinear xs) gives a note and no estimates.
    """
    xs, by = tuple(xs), tuple(by)
    _check_confidence(confidence)
    _check_tolerance(tolerance)
    _require(df, (*xs, y, *by))
    per_x = [f"{stat}_{x}" for x in xs for stat in ("exponent", "stderr", "ci_low", "ci_high", "ideal",
                                                    "assessment")]
    columns = [*by, "by", "y", "xs", "coefficient", *per_x, "r2", "residual_std", "n_points", "n_dropped", "dof",
               "confidence", "tolerance", "note"]
    direction = direction_of(y)
    rows = []
    for key, group in _groups(df, by):
        mask = _usable(group, (*xs, y))
        row = {**key, "by": ",".join(by), "y": y, "xs": ",".join(xs), "n_points": int(mask.sum()),
               "n_dropped": int((~mask).sum()), "confidence": confidence, "tolerance": tolerance, "note": ""}
        ideal_values = {x: (ideals(key, x, y) if ideals else None) for x in xs}
        for x in xs:
            row[f"ideal_{x}"] = math.nan if ideal_values[x] is None else ideal_values[x]
            row[f"assessment_{x}"] = "" if ideal_values[x] is None else "inconclusive"
        logs = np.log(np.column_stack([_numeric(group, c)[mask] for c in (*xs, y)]))
        design = np.column_stack([np.ones(len(logs)), logs[:, :-1]])
        n, k = design.shape
        if n < k + 1:
            row["note"] = f"no fit: need at least {k + 1} usable points for {len(xs)} variables, got {n}"
        elif np.linalg.matrix_rank(design) < k:
            single = [x for i, x in enumerate(xs) if np.unique(logs[:, i]).size < 2]
            why = (f"{', '.join(single)} takes a single value" if single
                   else f"log {' and log '.join(xs)} are collinear")
            row["note"] = f"no fit: rank-deficient design ({why})"
        else:
            coef, *_ = np.linalg.lstsq(design, logs[:, -1], rcond=None)
            resid = logs[:, -1] - design @ coef
            dof = n - k
            sigma2 = float(resid @ resid) / dof
            stderr = np.sqrt(sigma2 * np.diag(np.linalg.inv(design.T @ design)))
            half = _t_crit(confidence, dof) * stderr
            dy = logs[:, -1] - logs[:, -1].mean()
            row.update(coefficient=math.exp(coef[0]), dof=dof, residual_std=math.sqrt(sigma2),
                       r2=1 - float(resid @ resid) / float(dy @ dy) if dy @ dy > 0 else math.nan)
            reasons = []
            for i, x in enumerate(xs, start=1):
                row.update({f"exponent_{x}": coef[i], f"stderr_{x}": stderr[i], f"ci_low_{x}": coef[i] - half[i],
                            f"ci_high_{x}": coef[i] + half[i]})
                verdict = grade(coef[i] - half[i], coef[i] + half[i], ideal_values[x], tolerance, direction)
                row[f"assessment_{x}"] = verdict.assessment
                if verdict.reason:
                    reasons.append(f"b_{x}: {verdict.reason}")
            row["note"] = _join_notes(*reasons)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def _joint_ideal(key: dict, x: str, y: str) -> float | None:
    if x == "params":
        return 1.0
    if x == "n_devices" and not _shared_host(key):
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
        if not (_numeric(frame, y) > 0).any():
            continue
        part = joint_fit(frame, y, xs, by, confidence, _joint_ideal, tolerance)
        part = part[part["n_points"] > 0].copy()
        for i, r in part.iterrows():
            if _shared_host({c: r[c] for c in by}) and pd.notna(r.get("exponent_n_devices")):
                part.at[i, "assessment_n_devices"] = "not applicable"
                part.at[i, "note"] = _join_notes(f"b_n_devices: {SHARED_HOST_NOTE}", r["note"])
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
    _require(frame, (*by, "n_devices", "tokens_per_s"))
    rows_out = []
    for key, group in _groups(frame[_usable(frame, ("n_devices", "tokens_per_s"))], by):
        tps = _numeric(group, "tokens_per_s").groupby(_numeric(group, "n_devices")).median().sort_index()
        base_n, base_tps = tps.index[0], tps.iloc[0]
        note = SHARED_HOST_NOTE if _shared_host(key) else ""
        for n, value in tps.items():
            rows_out.append({**key, "n_devices": int(n), "base_n_devices": int(base_n), "tokens_per_s": value,
                             "tokens_per_s_per_device": value / n, "efficiency": (value / n) / (base_tps / base_n),
                             "note": note})
    return pd.DataFrame(rows_out, columns=columns)


# ------------------------------------------------------------------ Universal Scalability Law


@dataclasses.dataclass(frozen=True)
class UslFit:
    """X(N) = λN / (1 + σ(N − 1) + κN(N − 1)), fitted by least squares on log X.

    Attributes:
      lambda_, sigma, kappa: the rate of one device, contention, coherency.
      *_stderr, *_ci_low, *_ci_high: Wald t intervals at ``confidence`` (n − 3 dof)
        from the Jacobian at the optimum.
      peak_n: sqrt((1 − σ)/κ), where X peaks, when κ > 0 and σ < 1; else NaN.
      residual_std, n, dof: the log residuals' σ, points and degrees of freedom.
      covariance: 3×3 covariance of (log λ, σ, κ), for prediction intervals.
      model: ``usl``, or ``amdahl`` where κ could not be identified and was
        fixed at 0 (Amdahl's law: n − 2 dof; κ's interval is then NaN and its
        row and column of ``covariance`` zero).
    """

    lambda_: float
    sigma: float
    kappa: float
    sigma_stderr: float
    kappa_stderr: float
    sigma_ci_low: float
    sigma_ci_high: float
    kappa_ci_low: float
    kappa_ci_high: float
    peak_n: float
    residual_std: float
    n: int
    dof: int
    confidence: float
    covariance: tuple
    model: str = "usl"

    def predict(self, n) -> np.ndarray:
        """The fitted X at device counts n."""
        n = np.asarray(n, dtype=float)
        return self.lambda_ * n / (1 + self.sigma * (n - 1) + self.kappa * n * (n - 1))

    def prediction_interval(self, n) -> tuple[np.ndarray, np.ndarray]:
        """Prediction interval of one new observation of X at n (delta method in log X, t with n − 3 dof)."""
        n = np.atleast_1d(np.asarray(n, dtype=float))
        denom = 1 + self.sigma * (n - 1) + self.kappa * n * (n - 1)
        grad = np.column_stack([np.ones_like(n), -(n - 1) / denom, -n * (n - 1) / denom])
        var = np.einsum("ij,jk,ik->i", grad, np.asarray(self.covariance), grad) + self.residual_std ** 2
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN where the fitted curve is not positive
            center = np.log(np.where(denom > 0, self.predict(n), np.nan))
        half = _t_crit(self.confidence, self.dof) * np.sqrt(var)
        return np.exp(center - half), np.exp(center + half)


USL_MODELS = ("auto", "usl", "amdahl")


def fit_usl(n: Sequence[float], x: Sequence[float], confidence: float = 0.95, model: str = "auto") -> UslFit:
    """Fit the Universal Scalability Law to throughput x against device count n.

    Least squares on log X (multiplicative noise, as the power laws), started
    from the linear fit of N/X = 1/λ + (σ/λ)(N − 1) + (κ/λ)N(N − 1), then
    Levenberg–Marquardt on (log λ, σ, κ), unconstrained (σ < 0 is a superlinear
    speed-up, κ < 0 a curve that bends upward). Intervals are Wald t intervals
    with n − 3 degrees of freedom.

    Args:
      model: ``usl``; ``amdahl``, κ fixed at 0 (X = λN / (1 + σ(N − 1)), n − 2
        dof); ``auto`` (default), the USL where κ can be identified, else
        Amdahl's law (``UslFit.model`` says which).

    Raises:
      ValueError: fewer than 4 points or 4 distinct counts (3 for ``amdahl``),
        bad values, no convergence, or (``usl``) κ not identifiable.
    """
    _check_confidence(confidence)
    if model not in USL_MODELS:
        raise ValueError(f"model {model!r}: expected one of {', '.join(USL_MODELS)}")
    na, xa = np.asarray(n, dtype=float), np.asarray(x, dtype=float)
    if model == "amdahl":
        return _fit_contention(na, xa, confidence, with_kappa=False)
    try:
        return _fit_contention(na, xa, confidence, with_kappa=True)
    except _NotIdentifiable:
        if model == "usl":
            raise ValueError("the USL parameters are not identifiable from these device counts") from None
        return _fit_contention(na, xa, confidence, with_kappa=False)


class _NotIdentifiable(ValueError):
    """κ cannot be told apart from λ and σ with these counts (a singular Jacobian)."""


def _fit_contention(na: np.ndarray, xa: np.ndarray, confidence: float, with_kappa: bool) -> UslFit:
    """The USL (with κ) or Amdahl's law (κ = 0) by least squares on log X; see ``fit_usl``."""
    k = 3 if with_kappa else 2
    _validate_xy(na, xa, k + 1, "a USL fit" if with_kappa else "an Amdahl fit")
    if np.unique(na).size < k + 1:
        raise ValueError(f"need at least {k + 1} distinct device counts for {'a USL' if with_kappa else 'an Amdahl'} "
                         f"fit ({k} parameters and an interval), got {np.unique(na).size}")
    ly = np.log(xa)
    columns = [np.ones_like(na), na - 1, na * (na - 1)][:k]
    start, *_ = np.linalg.lstsq(np.column_stack(columns), na / xa, rcond=None)
    inv_lambda = start[0] if start[0] > 0 else float(np.median(na / xa))
    p0 = np.array([-math.log(inv_lambda), *(start[1:] / inv_lambda)])

    def denominator(p):
        return 1 + p[1] * (na - 1) + (p[2] * na * (na - 1) if with_kappa else 0.0)

    def residuals(p):
        return p[0] + np.log(na) - np.log(np.maximum(denominator(p), 1e-300)) - ly

    from scipy import optimize

    result = optimize.least_squares(residuals, p0, method="lm", x_scale="jac")
    if not result.success or (denominator(result.x) <= 0).any():
        raise ValueError(f"the {'USL' if with_kappa else 'Amdahl'} fit did not converge ({result.message})")
    dof = len(na) - k
    sigma2 = float(result.fun @ result.fun) / dof
    jtj = result.jac.T @ result.jac
    if np.linalg.matrix_rank(jtj) < k:
        raise _NotIdentifiable("the parameters are not identifiable from these device counts")
    cov = np.zeros((3, 3))
    cov[:k, :k] = sigma2 * np.linalg.inv(jtj)
    se = np.sqrt(np.clip(np.diag(cov), 0, None))
    t = _t_crit(confidence, dof)
    log_lambda, sigma = float(result.x[0]), float(result.x[1])
    kappa = float(result.x[2]) if with_kappa else 0.0
    kappa_low, kappa_high = (kappa - t * se[2], kappa + t * se[2]) if with_kappa else (math.nan, math.nan)
    peak = math.sqrt((1 - sigma) / kappa) if kappa > 0 and sigma < 1 else math.nan
    return UslFit(lambda_=math.exp(log_lambda), sigma=sigma, kappa=kappa, sigma_stderr=float(se[1]),
                  kappa_stderr=float(se[2]) if with_kappa else math.nan, sigma_ci_low=sigma - t * se[1],
                  sigma_ci_high=sigma + t * se[1], kappa_ci_low=kappa_low, kappa_ci_high=kappa_high, peak_n=peak,
                  residual_std=math.sqrt(sigma2), n=len(na), dof=dof, confidence=confidence,
                  covariance=tuple(map(tuple, cov)), model="usl" if with_kappa else "amdahl")


def usl_table(df: pd.DataFrame, x: str, ys: str | Sequence[str], by: Sequence[str] = (), confidence: float = 0.95,
              directions: dict[str, str] | None = None) -> pd.DataFrame:
    """Fit the USL to each y against x (a device count) within every group.

    A y that is a cost (``direction_of`` 'lower', e.g. a step time) is fitted
    as the rate 1/y. Groups with fewer than 4 distinct x get a row whose note
    says so and no estimates. Where κ cannot be identified from the counts,
    Amdahl's law (κ = 0) is fitted instead, and ``model`` says so.

    Returns:
      The ``by`` columns, then ``USL_COLUMNS``: by, x, y, model (``usl`` or
      ``amdahl``), lambda_, sigma, sigma_ci_low, sigma_ci_high, kappa
      (0 under Amdahl), kappa_ci_low, kappa_ci_high (empty under Amdahl), peak_n
      (empty when κ ≤ 0), peak_y (X at peak_n), residual_std, n_points,
      n_x_values, dof, confidence, note.
    """
    ys = (ys,) if isinstance(ys, str) else tuple(ys)
    by = tuple(by)
    _require(df, (x, *by, *ys))
    directions = directions or {}
    rows = []
    for key, group in _groups(df, by):
        for y in ys:
            mask = _usable(group, (x, y))
            xv, yv = _numeric(group, x)[mask].to_numpy(), _numeric(group, y)[mask].to_numpy()
            inverted = directions.get(y, direction_of(y)) == "lower"
            row = {**key, "by": ",".join(by), "x": x, "y": y, "n_points": int(mask.sum()),
                   "n_x_values": int(np.unique(xv).size), "confidence": confidence,
                   "note": "fitted to 1/y, a rate" if inverted else ""}
            if row["n_x_values"] < 4:
                row["note"] = _join_notes(f"too few {x} values for a USL fit: {row['n_x_values']} (need 4)",
                                          row["note"])
                rows.append(row)
                continue
            try:
                fit = fit_usl(xv, 1 / yv if inverted else yv, confidence)
            except ValueError as err:
                row["note"] = _join_notes(f"no fit: {err}", row["note"])
                rows.append(row)
                continue
            row.update(model=fit.model, lambda_=fit.lambda_, sigma=fit.sigma, sigma_ci_low=fit.sigma_ci_low,
                       sigma_ci_high=fit.sigma_ci_high, kappa=fit.kappa, kappa_ci_low=fit.kappa_ci_low,
                       kappa_ci_high=fit.kappa_ci_high, residual_std=fit.residual_std, dof=fit.dof)
            notes = []
            if fit.model == "amdahl":
                notes.append("κ not identifiable from these counts: Amdahl's law fitted (κ = 0)")
            if math.isfinite(fit.peak_n):
                row["peak_n"] = fit.peak_n
                row["peak_y"] = float(fit.predict(fit.peak_n))
                if fit.peak_n > xv.max():
                    notes.append(f"peak at {fit.peak_n:.3g} lies beyond the largest measured {x} ({xv.max():g})")
                if fit.kappa_ci_low <= 0:
                    notes.append("κ's interval includes 0: the peak is not established")
            if _shared_host(key):
                notes.append(SHARED_HOST_NOTE)
            row["note"] = _join_notes(*notes, row["note"])
            rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *USL_COLUMNS])


def default_usl(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The USL of tokens_per_s against n_devices per devices-family group (see ``usl_table``)."""
    rows = prepare_rows(runs)
    if not {"n_devices", "tokens_per_s"} <= set(rows.columns) or not (_numeric(rows, "tokens_per_s") > 0).any():
        return pd.DataFrame(columns=list(USL_COLUMNS))
    frame, by = family_frame(rows, ("n_devices",))
    frame = frame[_usable(frame, ("tokens_per_s",))]
    return usl_table(frame, "n_devices", "tokens_per_s", by, confidence)


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
    _check_confidence(confidence)
    _require(df, (x, *by, *ys))
    directions = directions or {}
    rows = []
    for key, group in _groups(df, by):
        for y in ys:
            mask = _usable(group, (x, y))
            xv, yv = _numeric(group, x)[mask].to_numpy(), _numeric(group, y)[mask].to_numpy()
            if np.unique(xv).size < 3:
                continue
            base = {**key, "by": ",".join(by), "y": y, "x": x, "confidence": confidence}
            note = SHARED_HOST_NOTE if _shared_host(key) else ""
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
    ys = [y for y in ("tokens_per_s", "step_time_s") if (_numeric(rows, y) > 0).any()]
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

    Points are matched on grid.KEY_COLUMNS plus size_name, dtype and batch_mode
    (a bfloat16 plan never stands in for a float32 run). Ratios:
    step_time_ratio = predicted_step_time_s / step_time_s; compiled_ratio = the
    plan's compiled_total_bytes / the measured run's; memory_ratio = the plan's
    compiled_total_bytes / the measured peak_bytes_in_use (empty where the
    backend keeps no allocator statistics, such as the CPU).

    Returns:
      ``PLAN_COLUMNS``, one row per matched (plan, point); empty without both kinds of rows.
    """
    from jaxscale.grid import KEY_COLUMNS

    if "row_source" not in runs.columns:
        return pd.DataFrame(columns=list(PLAN_COLUMNS))
    source = runs["row_source"].fillna("measured").astype(str)
    planned = runs[source.str.startswith("planned") & _status_ok(runs)]
    measured = runs[(source == "measured") & _status_ok(runs)]
    if planned.empty or measured.empty:
        return pd.DataFrame(columns=list(PLAN_COLUMNS))
    keys = [c for c in (*KEY_COLUMNS, "size_name", "dtype", "batch_mode") if c in runs.columns]

    def normalised(frame):
        out = frame.copy()
        for c in keys:
            out[c] = out[c].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        return out

    right = normalised(measured)
    numeric = ["step_time_s", "compiled_total_bytes", "peak_bytes_in_use"]
    for c in numeric:
        right[c] = _numeric(right, c)
    right = right.groupby(keys, sort=False).agg(
        {**{c: "median" for c in numeric}, **({"device_kind": "first"} if "device_kind" in right.columns else {})})
    right = right.rename(columns={"compiled_total_bytes": "measured_compiled_total_bytes",
                                  "device_kind": "measured_device_kind"}).reset_index()
    left = normalised(planned)
    left["plan_source"] = left["row_source"]
    left["predicted_step_time_s"] = _numeric(left, "predicted_step_time_s")
    left["plan_compiled_total_bytes"] = _numeric(left, "compiled_total_bytes")
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
    _check_confidence(confidence)
    _check_tolerance(tolerance)
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
            half = _t_crit(confidence, dof) * float(fit["stderr"])
            low, high = float(fit["exponent"]) - half, float(fit["exponent"]) + half
            t, p = _t_test(float(fit["exponent"]), float(fit["stderr"]), dof, exponent)
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
    mask = _usable(runs, (x, y))
    for column in by:
        if column not in runs.columns:
            return pd.DataFrame({"x": [], "y": []})
        value = fit_row[column]
        mask &= runs[column].isna() if pd.isna(value) else runs[column] == value
    return pd.DataFrame({"x": _numeric(runs, x)[mask].to_numpy(), "y": _numeric(runs, y)[mask].to_numpy()})
