"""Ratios new/base of step times with their intervals, and the drift between runs that widens them.

The ratio of two sets of per-step samples is the Hodges–Lehmann estimate: the
median of all pairwise ratios new_j / base_i. Its interval is Moses's: order
statistics of those pairwise ratios, with ranks from the exact null
distribution of the Mann–Whitney U statistic (a normal approximation for
large samples). It is distribution-free: it assumes only exchangeable samples
and a change that scales the step-time distribution, has exact coverage at any
sample size (the achieved level is reported where few samples cannot reach
the one asked for), needs no resampling (the same inputs always give the same
interval), and a few outlying steps cannot move it.

With three or more runs a side, the ratio is that of the geometric means of
the runs' median step times, with Welch's t interval over their logs: it holds
the drift between runs that per-step samples miss. Where there are fewer runs,
that drift is estimated from all points of a comparison at once (an empirical
null, Paule–Mandel).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

MIN_SAMPLES = 3  # fewer per side give no interval worth a verdict (at best 1 − 2/C(4,2) = 67% coverage)


def mann_whitney_null_cdf(n: int, m: int) -> np.ndarray:
    """P(U ≤ u) for u = 0..n·m under the null, exact (sample sizes n and m, no ties).

    The counts of U are the coefficients of the Gaussian binomial
    [n+m choose n]_q = Π_{i=1..n} (1 − q^(m+i)) / (1 − q^i), built one factor
    at a time (multiply, then divide by a running sum with stride i).
    """
    n, m = sorted((int(n), int(m)))
    size = n * m + 1
    poly = np.zeros(size)
    poly[0] = 1.0
    for i in range(1, n + 1):
        shift = m + i
        if shift < size:
            poly[shift:] -= poly[:size - shift].copy()
        pad = (-size) % i  # divide by (1 − q^i): c[k] += c[k − i], a cumulative sum within each residue class
        grid = np.concatenate([poly, np.zeros(pad)]).reshape(-1, i)
        poly = np.cumsum(grid, axis=0).reshape(-1)[:size]
    poly = np.clip(poly, 0.0, None)
    return np.cumsum(poly) / poly.sum()


@dataclasses.dataclass(frozen=True)
class RatioEstimate:
    """A ratio new/base of two sets of samples with its interval.

    Attributes:
      ratio: from ratio_interval, exp(Hodges–Lehmann shift of the logs), the
        median of all pairwise ratios new_j / base_i; from run_ratio_interval,
        the ratio of the geometric means of the run medians.
      ci_low, ci_high: the Moses or Welch interval (NaN with fewer than
        MIN_SAMPLES a side).
      level: the interval's coverage: the confidence asked for, or less where
        the sample sizes cannot reach it.
    """

    ratio: float
    ci_low: float
    ci_high: float
    level: float


EXACT_LIMIT = 40_000  # n·m up to which the exact null distribution is used (a 200 × 200 comparison)


def ratio_interval(base, new, confidence: float = 0.95) -> RatioEstimate:
    """Hodges–Lehmann ratio new/base of positive samples and its Moses confidence interval.

    Args:
      base, new: per-step times (any positive unit), at least one each.
      confidence: the two-sided coverage asked for.

    Returns:
      A RatioEstimate; its interval is NaN when a side has fewer than
      MIN_SAMPLES samples.
    """
    x = np.log(np.asarray(base, dtype=float))
    y = np.log(np.asarray(new, dtype=float))
    if not (len(x) and len(y)) or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("ratio_interval needs positive, finite samples on both sides")
    diffs = np.sort((y[None, :] - x[:, None]).ravel())
    ratio = float(np.exp(np.median(diffs)))
    n, m = len(x), len(y)
    if min(n, m) < MIN_SAMPLES:
        return RatioEstimate(ratio, math.nan, math.nan, math.nan)
    alpha = 1.0 - confidence
    if n * m <= EXACT_LIMIT:
        cdf = mann_whitney_null_cdf(n, m)
        # k: how many differences to cut from each end; P(U ≤ k − 1) ≤ α/2.
        k = int(np.searchsorted(cdf, alpha / 2 * (1 + 1e-9), side="right"))
        k = max(k, 1)
        level = 1.0 - 2.0 * float(cdf[k - 1])
    else:
        from scipy.stats import norm

        mean, sd = n * m / 2.0, math.sqrt(n * m * (n + m + 1) / 12.0)
        k = max(int(math.floor(mean - norm.ppf(1 - alpha / 2) * sd)), 1)
        level = 1.0 - 2.0 * float(norm.cdf((k - 0.5 - mean) / sd))
    return RatioEstimate(ratio, float(np.exp(diffs[k - 1])), float(np.exp(diffs[n * m - k])), level)


def run_ratio_interval(base_medians, new_medians, confidence: float = 0.95) -> RatioEstimate:
    """Ratio new/base of repeated runs and its Welch t interval, on the logs of the runs' median step times.

    A run's median averages many steps, so its log is close to normal, and the
    spread between runs holds the drift between runs that per-step samples
    miss. Unlike a rank interval it reaches any level with three runs a side
    (wide, where three runs are all there is).

    Returns:
      A RatioEstimate: the ratio of the geometric means of the run medians;
      NaN interval with fewer than MIN_SAMPLES runs a side.
    """
    from scipy.stats import t as student

    x = np.log(np.asarray(base_medians, dtype=float))
    y = np.log(np.asarray(new_medians, dtype=float))
    shift = float(y.mean() - x.mean())
    if min(len(x), len(y)) < MIN_SAMPLES:
        return RatioEstimate(math.exp(shift), math.nan, math.nan, math.nan)
    vx, vy = float(np.var(x, ddof=1)) / len(x), float(np.var(y, ddof=1)) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return RatioEstimate(math.exp(shift), math.exp(shift), math.exp(shift), confidence)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    half = float(student.ppf(0.5 + confidence / 2, df)) * se
    return RatioEstimate(math.exp(shift), math.exp(shift - half), math.exp(shift + half), confidence)


MIN_POINTS_FOR_DRIFT = 8  # points whose ratios estimate the drift between runs


@dataclasses.dataclass(frozen=True)
class RunDrift:
    """The spread of step time between two runs that their per-step samples cannot show.

    Attributes:
      sd: standard deviation of a point's log ratio due to the drift (≈ relative).
      df: degrees of freedom of that estimate (points used − 1).
      n_points: points it was estimated from.
      n_outliers: points left out as really changed (beyond 3 robust SDs).
    """

    sd: float
    df: int
    n_points: int
    n_outliers: int


def estimate_run_drift(log_ratios, within_sd) -> RunDrift:
    """The drift between two runs, from the ratios of all points of a comparison (an empirical null).

    Most points of a grid do not change, so the spread of their log ratios is
    the noise of a ratio between two runs (Efron's empirical null, for many
    simultaneous tests). Points beyond 3 robust standard deviations of the
    median (MAD × 1.4826) are taken as really changed and left out; the drift
    is the random-effects SD of the rest beyond their within-run noise
    (Paule–Mandel, so points with wide within-run intervals count for little).
    A change common to every point moves the ratios together, not their
    spread; where many points change by different amounts the spread grows
    and verdicts err towards ``noisy``.

    Args:
      log_ratios: log(ratio) of each point.
      within_sd: the standard deviation of each log ratio within its runs.

    Returns:
      A RunDrift; its sd is 0 when the within-run noise explains the spread,
      NaN with fewer than MIN_POINTS_FOR_DRIFT points.
    """
    d = np.asarray(log_ratios, dtype=float)
    s = np.asarray(within_sd, dtype=float)
    ok = np.isfinite(d) & np.isfinite(s)
    d, s = d[ok], s[ok]
    if len(d) < MIN_POINTS_FOR_DRIFT:
        return RunDrift(math.nan, 0, len(d), 0)
    centre = float(np.median(d))
    robust_sd = 1.4826 * float(np.median(np.abs(d - centre)))
    keep = np.abs(d - centre) <= 3 * robust_sd + 1e-12
    dk, sk = d[keep], np.maximum(s[keep], 1e-12)
    return RunDrift(_paule_mandel_sd(dk, sk), max(len(dk) - 1, 1), len(d), int((~keep).sum()))


def _paule_mandel_sd(d: np.ndarray, s: np.ndarray) -> float:
    """The between-run SD τ for which the weighted spread of d about its weighted mean is what k − 1 points give.

    Paule and Mandel's estimator of a random-effects variance: with weights
    w_i = 1 / (s_i² + τ²), Σ w_i (d_i − d̄_w)² = k − 1. Points whose own
    within-run noise is large count for little, so a few noisy points cannot
    hide the drift of the precise ones.
    """
    if len(d) < 2:
        return 0.0

    def q(tau: float) -> float:
        w = 1.0 / (s ** 2 + tau ** 2)
        mean = float(np.sum(w * d) / np.sum(w))
        return float(np.sum(w * (d - mean) ** 2))

    target = len(d) - 1
    if q(0.0) <= target:
        return 0.0
    low, high = 0.0, float(np.ptp(d)) + float(s.max()) + 1e-12
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if q(mid) > target else (low, mid)
    return high
