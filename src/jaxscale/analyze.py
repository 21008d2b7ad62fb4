"""Rows → fits: power laws y = a·x^b with t intervals, joint fits, scaling efficiency.

Everything here is a pure function of DataFrames and arrays; nothing prints or
touches files (report.py formats what these return). Fits are ordinary least
squares on (log x, log y), so the noise model is multiplicative: a step that is
10% slower counts the same at 1 ms as at 1 s.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy import stats

MEMORY_COLUMN = "memory_per_device_bytes"
SIZE_COLUMNS = ("size_name", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "vocab")
DEVICES_BY = (*SIZE_COLUMNS, "strategy", "batch_mode", "dtype")
# global_batch is not in the list; it is constant within one profile's
# (n_devices, batch_mode) and only splits merged CSVs that would otherwise mix batches.
MODEL_SIZE_BY = ("strategy", "n_devices", "batch_mode", "dtype", "seq_len", "global_batch")
JOINT_BY = ("strategy", "batch_mode", "dtype")
COLLECTIVE_COLUMNS = ("all_reduce_bytes", "all_gather_bytes", "reduce_scatter_bytes", "all_to_all_bytes",
                      "collective_permute_bytes")
# y columns where a larger exponent is better; every other default y is a cost.
HIGHER_IS_BETTER = frozenset({"tokens_per_s", "mfu", "hfu", "achieved_tflops_per_device"})
SHARDED_STRATEGIES = ("fsdp", "tp", "fsdp_tp")
# Slack on the interval when classifying, so an exact fit that lands 1e-16 off the
# ideal is still "linear".
_REGIME_TOL = 1e-9

IdealFn = Callable[[dict, str, str], "float | None"]

FIT_COLUMNS = ("by", "x", "y", "exponent", "stderr", "ci_low", "ci_high", "coefficient", "r2", "residual_std",
               "n_points", "n_dropped", "dof", "confidence", "ideal_exponent", "regime", "note", "log_x_mean",
               "x_min", "x_max")


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

    def mean_band(self, x) -> tuple[np.ndarray, np.ndarray]:
        """Confidence band (at ``confidence``) of the fitted mean of log y at x, mapped back to y.

        Var(fit at log x) = σ²/n + stderr²·(log x − mean log x)², narrowest at the data's centre.
        """
        lx = np.log(np.asarray(x, dtype=float))
        se = np.sqrt(self.residual_std ** 2 / self.n + (self.stderr * (lx - self.log_x_mean)) ** 2)
        center = math.log(self.coefficient) + self.exponent * lx
        t = _t_crit(self.confidence, self.dof)
        return np.exp(center - t * se), np.exp(center + t * se)

    @classmethod
    def from_row(cls, row) -> PowerLawFit:
        """Rebuild a fit from a row of ``fit_table`` (a dict or a pandas Series)."""
        values = {f.name: float(row["n_points" if f.name == "n" else f.name]) for f in dataclasses.fields(cls)}
        return cls(**{**values, "n": int(values["n"]), "dof": int(values["dof"])})


def _t_crit(confidence: float, dof: int) -> float:
    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def _t_test(estimate: float, stderr: float, dof: int, claimed: float) -> tuple[float, float]:
    diff = estimate - claimed
    if stderr == 0:
        # An exact fit: the claim either matches to rounding or is rejected outright.
        return (0.0, 1.0) if abs(diff) <= _REGIME_TOL else (math.copysign(math.inf, diff), 0.0)
    t = diff / stderr
    return float(t), float(2 * stats.t.sf(abs(t), dof))


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


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
    if xa.ndim != 1 or ya.ndim != 1:
        raise ValueError(f"x and y must be 1-D, got shapes {xa.shape} and {ya.shape}")
    if len(xa) != len(ya):
        raise ValueError(f"x and y have different lengths: {len(xa)} and {len(ya)}")
    if len(xa) < 3:
        raise ValueError(f"need at least 3 points for a power-law fit with an interval, got {len(xa)}")
    for name, values in (("x", xa), ("y", ya)):
        bad = ~np.isfinite(values) | (values <= 0)
        if bad.any():
            raise ValueError(f"{name} must be positive and finite for a log-log fit; "
                             f"bad values at positions {np.flatnonzero(bad).tolist()}: {values[bad].tolist()}")
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


def classify_regime(ci_low: float, ci_high: float, ideal: float | None) -> str:
    """'linear' when [ci_low, ci_high] contains the ideal exponent, else 'sublinear' / 'superlinear'.

    The comparison is of exponents, whatever y means: for a cost such as step
    time, 'superlinear' (exponent above the ideal) is worse than ideal. Returns ''
    when there is no ideal or no interval.
    """
    if ideal is None or any(v is None or not np.isfinite(v) for v in (ci_low, ci_high, ideal)):
        return ""
    if ci_high < ideal - _REGIME_TOL:
        return "sublinear"
    if ci_low > ideal + _REGIME_TOL:
        return "superlinear"
    return "linear"


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def _usable(df: pd.DataFrame, columns: Iterable[str]) -> pd.Series:
    """Rows with status 'ok' (when there is a status column) and positive, finite values in ``columns``."""
    mask = pd.Series(True, index=df.index)
    if "status" in df.columns:
        mask &= df["status"].astype(str).str.strip() == "ok"
    for column in columns:
        values = _numeric(df, column)
        mask &= np.isfinite(values) & (values > 0)
    return mask


def _groups(df: pd.DataFrame, by: Sequence[str]) -> Iterator[tuple[dict, pd.DataFrame]]:
    if not by:
        yield {}, df
        return
    # sort=False keeps sweep order and tolerates mixed-type group columns.
    for key, group in df.groupby(list(by), sort=False, dropna=False):
        yield dict(zip(by, key)), group


def _require(df: pd.DataFrame, columns: Iterable[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in df.columns]
    if missing:
        raise ValueError(f"columns not found: {missing}; available: {list(df.columns)}")


def _ideal_fn(ideal: float | IdealFn | None) -> IdealFn:
    if callable(ideal):
        return ideal
    value = 1.0 if ideal is None else float(ideal)
    return lambda key, x, y: value


def fit_table(df: pd.DataFrame, x: str, ys: str | Sequence[str], by: Sequence[str] = (),
              ideal: float | IdealFn | None = None, confidence: float = 0.95) -> pd.DataFrame:
    """Fit each y against x within every group of the ``by`` columns.

    Rows whose ``status`` (if the column exists) is not "ok", or whose x or y is
    missing or non-positive, are left out and counted in ``n_dropped``. A group
    with fewer than 3 usable points or a single distinct x gets a row with no
    exponent and a ``note`` saying why.

    Args:
      df: the rows; x and y values may be strings (coerced to numbers).
      x: the column to use as x.
      ys: one y column or several.
      by: group columns.
      ideal: the exponent each fit is compared with: None → 1, a number, or
        ``ideal(group_key_dict, x, y) -> float | None``; a None from the callable
        means there is no ideal, and ``regime`` is left empty.
      confidence: level of the exponent intervals.

    Returns:
      One row per (group, y) with columns: the ``by`` columns, then ``FIT_COLUMNS``:
      by (the group columns, comma-joined), x, y, exponent, stderr, ci_low, ci_high,
      coefficient, r2, residual_std, n_points, n_dropped, dof, confidence,
      ideal_exponent, regime, note, log_x_mean, x_min, x_max.
    """
    ys = (ys,) if isinstance(ys, str) else tuple(ys)
    by = tuple(by)
    _check_confidence(confidence)
    _require(df, (x, *by, *ys))
    ideal_of = _ideal_fn(ideal)
    rows = []
    for key, group in _groups(df, by):
        for y in ys:
            mask = _usable(group, (x, y))
            row = {**key, "by": ",".join(by), "x": x, "y": y, "n_points": int(mask.sum()),
                   "n_dropped": int((~mask).sum()), "confidence": confidence, "regime": "", "note": ""}
            target = ideal_of(key, x, y)
            row["ideal_exponent"] = math.nan if target is None else float(target)
            try:
                fit = fit_power_law(_numeric(group, x)[mask], _numeric(group, y)[mask], confidence)
            except ValueError as err:
                row["note"] = f"no fit: {err}"
            else:
                row.update({f.name: getattr(fit, f.name) for f in dataclasses.fields(fit) if f.name != "n"})
                row["regime"] = classify_regime(fit.ci_low, fit.ci_high, target)
            rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])


def add_memory_column(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``df`` with ``memory_per_device_bytes`` and ``memory_source``.

    The memory is ``peak_bytes_in_use`` where that is a positive number (the
    allocator's measurement), else ``compiled_total_bytes`` (XLA's plan). Either
    column may be absent; with neither the memory is NaN and the source empty.
    """
    out = df.copy()
    peak, compiled = _numeric(df, "peak_bytes_in_use"), _numeric(df, "compiled_total_bytes")
    has_peak = np.isfinite(peak) & (peak > 0)
    out[MEMORY_COLUMN] = peak.where(has_peak, compiled)
    out["memory_source"] = np.where(has_peak, "peak_bytes_in_use",
                                    np.where(np.isfinite(compiled), "compiled_total_bytes", ""))
    return out


def devices_ideal(key: dict, x: str, y: str) -> float | None:
    """The ideal exponent of y against n_devices for a group (see ``default_fits``)."""
    if y == "tokens_per_s":
        return 1.0
    if y == "step_time_s":
        return {"strong": -1.0, "weak": 0.0}.get(key.get("batch_mode"))
    if y in (MEMORY_COLUMN, "compiled_argument_bytes"):
        strategy = key.get("strategy")
        return 0.0 if strategy == "dp" else -1.0 if strategy in SHARDED_STRATEGIES else None
    return None


def _assessment(y: str, regime: str) -> str:
    if not regime:
        return ""
    if regime == "linear":
        return "as ideal"
    better = (regime == "superlinear") == (y in HIGHER_IS_BETTER)
    return "better than ideal" if better else "worse than ideal"


# (family, x, ys, by, ideal)
_FAMILIES: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...], float | IdealFn | None], ...] = (
    ("devices", "n_devices", ("step_time_s", "tokens_per_s", MEMORY_COLUMN, "compiled_argument_bytes"),
     DEVICES_BY, devices_ideal),
    ("communication", "n_devices", COLLECTIVE_COLUMNS, DEVICES_BY, lambda key, x, y: None),
    ("model_size", "params", ("step_time_s", MEMORY_COLUMN, "model_flops_per_step"), MODEL_SIZE_BY, 1.0),
)


def default_fits(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The standard fits of jaxscale's runs.csv rows, in one frame with a ``family`` column.

    Families:
      devices: step_time_s, tokens_per_s, memory_per_device_bytes,
        compiled_argument_bytes against n_devices, per model size (size_name,
        d_model, n_layers, n_heads, d_ff, seq_len, vocab) × strategy × batch_mode
        × dtype. Ideals: tokens_per_s 1; step_time_s −1 (strong) or 0 (weak);
        memory and argument bytes 0 for dp, −1 for fsdp, tp, fsdp_tp.
      communication: the collective byte columns against n_devices, same groups,
        no ideal (ideal_exponent NaN, regime empty: collective volume has no
        single right slope, and "relative to 1" would mislead). Groups where a
        collective never appears get no row.
      model_size: step_time_s, memory_per_device_bytes, model_flops_per_step
        against params, per strategy × n_devices × batch_mode × dtype × seq_len
        × global_batch; ideal 1.

    Group columns absent from ``runs`` are skipped, and so is a y column with no
    positive value anywhere (for example collectives on one device).

    Args:
      runs: runs.csv rows (see records.COLUMNS); numbers may be strings.
      confidence: level of the exponent intervals.

    Returns:
      family, the union of the families' group columns, ``FIT_COLUMNS``, and
      ``assessment`` ("as ideal", "better than ideal", "worse than ideal", or ""),
      which reads the regime in y's direction (higher tokens_per_s is better,
      lower time and bytes are better).
    """
    runs = add_memory_column(runs)
    parts = []
    for family, x, ys, by, ideal in _FAMILIES:
        present = [y for y in ys if (_numeric(runs, y) > 0).any()]
        if x not in runs.columns or not present:
            continue
        part = fit_table(runs, x, present, tuple(c for c in by if c in runs.columns), ideal, confidence)
        if family == "communication":
            # A strategy that never issues a collective (dp never all-gathers) is not a failed fit.
            part = part[part["n_points"] > 0]
        part.insert(0, "family", family)
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["family", *FIT_COLUMNS, "assessment"])
    out = pd.concat(parts, ignore_index=True)
    group_columns = [c for c in out.columns if c not in ("family", *FIT_COLUMNS)]
    out = out[["family", *group_columns, *FIT_COLUMNS]].copy()
    out["assessment"] = [_assessment(y, r) for y, r in zip(out["y"], out["regime"])]
    return out


def joint_fit(df: pd.DataFrame, y: str, xs: Sequence[str] = ("params", "n_devices"),
              by: Sequence[str] = ("strategy",), confidence: float = 0.95) -> pd.DataFrame:
    """Fit log y = log a + Σ b_i log x_i by least squares within each group.

    Args:
      df: the rows (status and missing values handled as in ``fit_table``).
      y: the y column.
      xs: the x columns.
      by: group columns.
      confidence: level of the t intervals (n − len(xs) − 1 dof).

    Returns:
      One row per group: the ``by`` columns, by, y, xs (comma-joined), coefficient,
      for each x: exponent_<x>, stderr_<x>, ci_low_<x>, ci_high_<x>; then r2,
      residual_std, n_points, n_dropped, dof, confidence, note. Too few points or a
      rank-deficient design (an x with one distinct value, or collinear xs) gives a
      note and no estimates.
    """
    xs, by = tuple(xs), tuple(by)
    _check_confidence(confidence)
    _require(df, (*xs, y, *by))
    per_x = [f"{stat}_{x}" for x in xs for stat in ("exponent", "stderr", "ci_low", "ci_high")]
    columns = [*by, "by", "y", "xs", "coefficient", *per_x, "r2", "residual_std", "n_points", "n_dropped", "dof",
               "confidence", "note"]
    rows = []
    for key, group in _groups(df, by):
        mask = _usable(group, (*xs, y))
        row = {**key, "by": ",".join(by), "y": y, "xs": ",".join(xs), "n_points": int(mask.sum()),
               "n_dropped": int((~mask).sum()), "confidence": confidence, "note": ""}
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
            for i, x in enumerate(xs, start=1):
                row.update({f"exponent_{x}": coef[i], f"stderr_{x}": stderr[i], f"ci_low_{x}": coef[i] - half[i],
                            f"ci_high_{x}": coef[i] + half[i]})
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def default_joint_fit(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """step_time_s on params and n_devices per (strategy, batch_mode, dtype) present in ``runs``."""
    return joint_fit(runs, "step_time_s", ("params", "n_devices"), tuple(c for c in JOINT_BY if c in runs.columns),
                     confidence)


def scaling_efficiency(runs: pd.DataFrame, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Throughput per device relative to the group's smallest device count.

    efficiency = (tokens_per_s(n) / n) / (tokens_per_s(n_base) / n_base). Repeated
    rows at one device count (a resumed sweep) are combined by their median.

    Args:
      runs: runs.csv rows; rows not "ok" or without a positive tokens_per_s are ignored.
      by: group columns; default the model size, strategy, batch_mode and dtype
        columns present in ``runs``.

    Returns:
      The group columns, n_devices, base_n_devices, tokens_per_s,
      tokens_per_s_per_device, efficiency; one row per group and device count.
    """
    by = tuple(c for c in DEVICES_BY if c in runs.columns) if by is None else tuple(by)
    columns = [*by, "n_devices", "base_n_devices", "tokens_per_s", "tokens_per_s_per_device", "efficiency"]
    _require(runs, (*by, "n_devices", "tokens_per_s"))
    rows = []
    for key, group in _groups(runs[_usable(runs, ("n_devices", "tokens_per_s"))], by):
        tps = _numeric(group, "tokens_per_s").groupby(_numeric(group, "n_devices")).median().sort_index()
        base_n, base_tps = tps.index[0], tps.iloc[0]
        for n, value in tps.items():
            rows.append({**key, "n_devices": int(n), "base_n_devices": int(base_n), "tokens_per_s": value,
                         "tokens_per_s_per_device": value / n, "efficiency": (value / n) / (base_tps / base_n)})
    return pd.DataFrame(rows, columns=columns)


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
                      confidence: float = 0.95) -> pd.DataFrame:
    """Per group, do the data reject the claim that y ∝ x^exponent?

    The claim is rejected when it lies outside the exponent's t interval at
    ``confidence``, equivalently when the two-sided p value is below 1 − confidence.

    Args:
      data: raw rows (fitted here with ``fit_table``), or a fits table (a frame
        with an ``exponent`` column), whose rows with this y and x are tested.
      y, x: the columns of the claim.
      exponent: the claimed exponent.
      by: group columns when fitting raw rows; None → the default family's
        groups for x = n_devices or params (columns present in data), else none.
        Ignored for a fits table.
      confidence: level of the test.

    Returns:
      The fits' group columns and family (when present), then y, x,
      claimed_exponent, exponent, stderr, ci_low, ci_high, confidence, t_stat,
      p_value, rejected (True/False, None without a fit), n_points, note.
    """
    _check_confidence(confidence)
    if "exponent" in data.columns:
        fits = data[(data["y"] == y) & (data["x"] == x)]
    else:
        data = add_memory_column(data) if y == MEMORY_COLUMN and y not in data.columns else data
        if by is None:
            by = [c for c in {"n_devices": DEVICES_BY, "params": MODEL_SIZE_BY}.get(x, ()) if c in data.columns]
        fits = fit_table(data, x, y, by, confidence=confidence)
    stat_cols = (set(FIT_COLUMNS) - {"by"}) | {"assessment"}
    keep = [c for c in fits.columns if c not in stat_cols]
    rows = []
    for _, fit in fits.iterrows():
        row = {**{c: fit[c] for c in keep}, "y": y, "x": x, "claimed_exponent": exponent, "confidence": confidence,
               "n_points": fit["n_points"], "note": fit["note"] if isinstance(fit["note"], str) else "",
               "rejected": None}
        if pd.notna(fit["exponent"]):
            dof = int(fit["n_points"]) - 2
            half = _t_crit(confidence, dof) * float(fit["stderr"])
            t, p = _t_test(float(fit["exponent"]), float(fit["stderr"]), dof, exponent)
            row.update(exponent=fit["exponent"], stderr=fit["stderr"], ci_low=fit["exponent"] - half,
                       ci_high=fit["exponent"] + half, t_stat=t, p_value=p, rejected=bool(p < 1 - confidence))
        rows.append(row)
    if not rows:
        rows.append({"y": y, "x": x, "claimed_exponent": exponent, "confidence": confidence, "rejected": None,
                     "note": f"no fit of {y} against {x} in the fits table"})
    return pd.DataFrame(rows, columns=[*keep, "y", "x", "claimed_exponent", "exponent", "stderr", "ci_low",
                                       "ci_high", "confidence", "t_stat", "p_value", "rejected", "n_points", "note"])


def fit_points(runs: pd.DataFrame, fit_row) -> pd.DataFrame:
    """The usable (x, y) points behind one row of a fits table, for plotting.

    Args:
      runs: the rows that were fitted.
      fit_row: a row of ``fit_table`` / ``default_fits`` (dict or Series).

    Returns:
      A frame with columns x and y, in the rows' order.
    """
    x, y = fit_row["x"], fit_row["y"]
    if y == MEMORY_COLUMN and y not in runs.columns:
        runs = add_memory_column(runs)
    if x not in runs.columns or y not in runs.columns:
        return pd.DataFrame({"x": [], "y": []})
    mask = _usable(runs, (x, y))
    by = fit_row["by"] if isinstance(fit_row["by"], str) else ""
    for column in filter(None, by.split(",")):
        value = fit_row[column]
        mask &= runs[column].isna() if pd.isna(value) else runs[column] == value
    return pd.DataFrame({"x": _numeric(runs, x)[mask].to_numpy(), "y": _numeric(runs, y)[mask].to_numpy()})
