"""Power laws y = a·x^b: the fit with t intervals, the curvature test, verdicts, and fit tables per group of rows.

Fits are ordinary least squares on (log x, log y), so the noise model is
multiplicative: a step that is 10% slower counts the same at 1 ms as at 1 s.

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
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from jaxscale.families import (group_positions, grouped, numeric_column, positive, require_columns, succeeded,
                               usable_rows)

DEFAULT_TOLERANCE = 0.05
# y columns where a larger value is better; costs (time, bytes) are named by their suffix.
HIGHER_IS_BETTER = frozenset({"tokens_per_s", "mfu", "hfu", "achieved_tflops_per_device", "efficiency",
                              "predicted_mfu"})
# Slack when comparing interval ends with band edges, so an exact fit that lands
# 1e-16 off the ideal still counts as inside.
_EDGE_EPS = 1e-9

IdealFn = Callable[[dict, str, str], "float | None"]

FIT_COLUMNS = ("by", "x", "y", "exponent", "stderr", "ci_low", "ci_high", "coefficient", "r2", "residual_std",
               "n_points", "n_dropped", "dof", "confidence", "ideal_exponent", "tolerance", "direction",
               "assessment", "regime", "curvature", "slope_change", "curvature_p", "note", "log_x_mean", "x_min",
               "x_max")


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
        t = t_critical(self.confidence, self.dof)
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


def t_critical(confidence: float, dof: int) -> float:
    """The two-sided t quantile at ``confidence`` with ``dof`` degrees of freedom."""
    from scipy import stats  # scipy loads in about a second: only where a fit needs it

    return float(stats.t.ppf(0.5 + confidence / 2, dof))


def t_test(estimate: float, stderr: float, dof: int, claimed: float) -> tuple[float, float]:
    """(t statistic, two-sided p value) of the claim that the estimate equals ``claimed``."""
    diff = estimate - claimed
    if stderr == 0:
        # An exact fit: the claim either matches to rounding or is rejected outright.
        return (0.0, 1.0) if abs(diff) <= _EDGE_EPS else (math.copysign(math.inf, diff), 0.0)
    from scipy import stats

    t = diff / stderr
    return float(t), float(2 * stats.t.sf(abs(t), dof))


def check_confidence(confidence: float) -> None:
    """Raise a ValueError unless 0 < confidence < 1."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def check_tolerance(tolerance: float) -> None:
    """Raise a ValueError unless the tolerance is a finite number >= 0."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")


def validate_xy(xa: np.ndarray, ya: np.ndarray, minimum: int, what: str) -> None:
    """Raise a ValueError unless x and y are 1-D, equally long, at least ``minimum`` long, positive and finite."""
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
    check_confidence(confidence)
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    validate_xy(xa, ya, 3, "a power-law fit with an interval")
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
    half = t_critical(confidence, dof) * stderr
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
    validate_xy(xa, ya, 4, "a curvature test")
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


def join_notes(*notes: str) -> str:
    """The non-empty notes, each once, joined with '; '."""
    return "; ".join(n for n in dict.fromkeys(notes) if n)


# ------------------------------------------------------------------ fit tables


def _ideal_fn(ideal: float | IdealFn | None) -> IdealFn:
    if callable(ideal):
        return ideal
    value = 1.0 if ideal is None else float(ideal)
    return lambda key, x, y: value


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
        row["note"] = join_notes("too few points (3: 1 degree of freedom)", row["note"])
    try:
        bend = curvature_test(xv, yv, confidence, tolerance)
    except ValueError:
        pass
    else:
        row.update(curvature=bend.label, slope_change=bend.slope_change, curvature_p=bend.p_value)
        if bend.label:
            row["note"] = join_notes(row["note"], f"{bend.label}: the local exponent changes by "
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
    check_confidence(confidence)
    check_tolerance(tolerance)
    require_columns(df, (x, *by, *ys))
    ideal_of = _ideal_fn(ideal)
    directions = directions or {}
    ok = succeeded(df).to_numpy()
    xs_all = numeric_column(df, x).to_numpy()
    ys_all = {y: numeric_column(df, y).to_numpy() for y in ys}
    rows = []
    for key, positions in group_positions(df, by):
        xg = xs_all[positions]
        for y in ys:
            yg = ys_all[y][positions]
            mask = ok[positions] & positive(xg) & positive(yg)
            rows.append(_fit_row(key, by, x, y, xg[mask], yg[mask], int((~mask).sum()), ideal_of(key, x, y),
                                 confidence, tolerance, directions.get(y, direction_of(y))))
    return pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])


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
    check_confidence(confidence)
    check_tolerance(tolerance)
    require_columns(df, (*xs, y, *by))
    per_x = [f"{stat}_{x}" for x in xs for stat in ("exponent", "stderr", "ci_low", "ci_high", "ideal",
                                                    "assessment")]
    columns = [*by, "by", "y", "xs", "coefficient", *per_x, "r2", "residual_std", "n_points", "n_dropped", "dof",
               "confidence", "tolerance", "note"]
    direction = direction_of(y)
    rows = []
    for key, group in grouped(df, by):
        mask = usable_rows(group, (*xs, y))
        row = {**key, "by": ",".join(by), "y": y, "xs": ",".join(xs), "n_points": int(mask.sum()),
               "n_dropped": int((~mask).sum()), "confidence": confidence, "tolerance": tolerance, "note": ""}
        ideal_values = {x: (ideals(key, x, y) if ideals else None) for x in xs}
        for x in xs:
            row[f"ideal_{x}"] = math.nan if ideal_values[x] is None else ideal_values[x]
            row[f"assessment_{x}"] = "" if ideal_values[x] is None else "inconclusive"
        logs = np.log(np.column_stack([numeric_column(group, c)[mask] for c in (*xs, y)]))
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
            half = t_critical(confidence, dof) * stderr
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
            row["note"] = join_notes(*reasons)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)
