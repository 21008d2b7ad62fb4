"""intervals.py: the exact null distribution, coverage of the ratio intervals at planted ratios, the drift estimate."""

import itertools
import math

import numpy as np
import pytest

from jaxscale.intervals import estimate_run_drift, mann_whitney_null_cdf, ratio_interval, run_ratio_interval


@pytest.mark.parametrize("n,m", [(3, 3), (4, 6), (5, 5)])
def test_mann_whitney_null_matches_enumeration(n, m):
    # Independent: enumerate every placement of the n base ranks among n + m and count U.
    counts = np.zeros(n * m + 1)
    for ranks in itertools.combinations(range(n + m), n):
        chosen = set(ranks)
        counts[sum(1 for a in ranks for b in range(n + m) if b not in chosen and a > b)] += 1
    assert mann_whitney_null_cdf(n, m) == pytest.approx(np.cumsum(counts) / counts.sum(), abs=1e-12)


def test_identical_shapes_scaled_give_the_planted_ratio_exactly():
    base = np.array([1.0, 1.1, 0.9, 1.05, 0.97, 1.2])
    est = ratio_interval(base, base * 1.3)
    assert est.ratio == pytest.approx(1.3)
    assert est.ci_low < 1.3 < est.ci_high and est.level >= 0.95


@pytest.mark.parametrize("n,m,shape", [(5, 5, "lognormal"), (10, 12, "spiky"), (30, 30, "lognormal"),
                                       (210, 200, "spiky")])
def test_interval_covers_a_planted_ratio_at_its_level(n, m, shape):
    """Coverage over 400 seeded comparisons with new = 1.3 × base in distribution.

    "spiky": 10% of steps take 1.5-3x longer (a host hiccup), which a
    distribution-free interval must survive. 210 × 200 takes the normal
    approximation.
    """
    rng = np.random.default_rng(n * 1000 + m)
    planted, hits, levels = 1.3, 0, []

    def draw(k):
        x = 0.02 * np.exp(rng.normal(0, 0.1, k))
        if shape == "spiky":
            x = x * np.where(rng.random(k) < 0.1, rng.uniform(1.5, 3.0, k), 1.0)
        return x

    trials = 400
    for _ in range(trials):
        est = ratio_interval(draw(n), planted * draw(m), confidence=0.95)
        hits += est.ci_low <= planted <= est.ci_high
        levels.append(est.level)
    level = float(np.mean(levels))
    assert level >= 0.95 - 2e-3  # the exact interval never offers less than asked (normal approx: about)
    se = math.sqrt(level * (1 - level) / trials)
    assert hits / trials >= level - 3 * se, (hits, level)
    assert hits / trials <= min(1.0, level + 3 * se + 0.01), (hits, level)


def test_interval_over_runs_covers_a_planted_ratio():
    """Welch's interval on run medians: 3 to 6 runs a side, each run's median off by a 5% drift."""
    rng = np.random.default_rng(21)
    for k in (3, 6):
        hits = 0
        for _ in range(400):
            base = 0.02 * np.exp(rng.normal(0, 0.05, k))
            new = 1.3 * 0.02 * np.exp(rng.normal(0, 0.05, k))
            est = run_ratio_interval(base, new, confidence=0.95)
            hits += est.ci_low <= 1.3 <= est.ci_high
        assert 0.95 - 3 * math.sqrt(0.95 * 0.05 / 400) <= hits / 400 <= 0.99, (k, hits)


def test_few_samples_give_the_level_they_can():
    est = ratio_interval([1.0, 1.1, 0.9], [1.2, 1.3, 1.25], confidence=0.95)
    assert est.level == pytest.approx(1 - 2 / math.comb(6, 3))  # min and max of the 9 ratios: 90%
    assert est.ci_low == pytest.approx(1.2 / 1.1) and est.ci_high == pytest.approx(1.3 / 0.9)
    assert math.isnan(ratio_interval([1.0, 1.1], [1.2, 1.3]).ci_low)


def test_drift_estimate_recovers_a_planted_spread_and_ignores_changed_points():
    rng = np.random.default_rng(7)
    d = rng.normal(0.0, 0.1, 400)
    d[:10] += 1.0  # ten points really changed
    drift = estimate_run_drift(d, np.full(400, 0.02))
    assert drift.sd == pytest.approx(math.sqrt(0.1 ** 2 - 0.02 ** 2), rel=0.1)
    assert drift.n_outliers >= 10
    assert math.isnan(estimate_run_drift(d[:5], np.full(5, 0.02)).sd)
    # a few points with very wide within-run intervals (single-device steps of a millisecond) do not hide
    # the drift of the precise ones
    precise = rng.normal(0.0, 0.1, 300) + rng.normal(0.0, 0.01, 300)
    noisy = rng.normal(0.0, 0.5, 60)
    drift = estimate_run_drift(np.concatenate([precise, noisy]), np.r_[np.full(300, 0.01), np.full(60, 0.5)])
    assert drift.sd == pytest.approx(0.1, rel=0.15)
