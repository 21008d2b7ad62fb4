"""The Universal Scalability Law X(N) = λN / (1 + σ(N − 1) + κN(N − 1)): the fit, its intervals, and USL tables.

Fits are least squares on log X (multiplicative noise, as the power laws);
where κ cannot be identified from the device counts, Amdahl's law (κ = 0) is
fitted instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import pandas as pd

from jaxscale.families import (SHARED_HOST_NOTE, family_frame, numeric_column, prepare_rows, shared_host,
                               usable_rows, xy_groups)
from jaxscale.powerlaw import check_confidence, direction_of, join_notes, t_critical, validate_xy

USL_COLUMNS = ("by", "x", "y", "model", "lambda_", "sigma", "sigma_ci_low", "sigma_ci_high", "kappa", "kappa_ci_low",
               "kappa_ci_high", "peak_n", "peak_y", "residual_std", "n_points", "n_x_values", "dof", "confidence",
               "note")


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
        half = t_critical(self.confidence, self.dof) * np.sqrt(var)
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
    check_confidence(confidence)
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
    validate_xy(na, xa, k + 1, "a USL fit" if with_kappa else "an Amdahl fit")
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
    t = t_critical(confidence, dof)
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
    directions = directions or {}
    rows = []
    for key, y, mask, xv, yv in xy_groups(df, x, ys, by):
        inverted = directions.get(y, direction_of(y)) == "lower"
        row = {**key, "by": ",".join(by), "x": x, "y": y, "n_points": int(mask.sum()),
               "n_x_values": int(np.unique(xv).size), "confidence": confidence,
               "note": "fitted to 1/y, a rate" if inverted else ""}
        if row["n_x_values"] < 4:
            row["note"] = join_notes(f"too few {x} values for a USL fit: {row['n_x_values']} (need 4)",
                                      row["note"])
            rows.append(row)
            continue
        try:
            fit = fit_usl(xv, 1 / yv if inverted else yv, confidence)
        except ValueError as err:
            row["note"] = join_notes(f"no fit: {err}", row["note"])
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
        if shared_host(key):
            notes.append(SHARED_HOST_NOTE)
        row["note"] = join_notes(*notes, row["note"])
        rows.append(row)
    return pd.DataFrame(rows, columns=[*by, *USL_COLUMNS])


def default_usl(runs: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """The USL of tokens_per_s against n_devices per devices-family group (see ``usl_table``)."""
    rows = prepare_rows(runs)
    if not {"n_devices", "tokens_per_s"} <= set(rows.columns) or not (numeric_column(rows, "tokens_per_s") > 0).any():
        return pd.DataFrame(columns=list(USL_COLUMNS))
    frame, by = family_frame(rows, ("n_devices",))
    frame = frame[usable_rows(frame, ("tokens_per_s",))]
    return usl_table(frame, "n_devices", "tokens_per_s", by, confidence)
