"""usl.py: the Universal Scalability Law and Amdahl's law on planted knees and a published table (no jax here)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from jaxscale.powerlaw import fit_table
from jaxscale.usl import fit_usl, usl_table


def usl_curve(n, sigma, kappa, lam=1000.0):
    n = np.asarray(n, dtype=float)
    return lam * n / (1 + sigma * (n - 1) + kappa * n * (n - 1))


def test_usl_interval_coverage_over_seeds():
    rng = np.random.default_rng(2024)
    n = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    sigma, kappa, trials = 0.05, 0.001, 300
    clean = usl_curve(n, sigma, kappa)
    hits = np.zeros(2)
    for _ in range(trials):
        fit = fit_usl(n, clean * np.exp(rng.normal(0, 0.03, n.size)))
        hits += [fit.sigma_ci_low <= sigma <= fit.sigma_ci_high, fit.kappa_ci_low <= kappa <= fit.kappa_ci_high]
    # Binomial sd of a 95% rate over 300 trials is 0.0126; allow 3 sd.
    np.testing.assert_allclose(hits / trials, 0.95, atol=0.038)


def test_usl_finds_the_peak_of_a_planted_knee():
    n = np.array([1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128], dtype=float)
    sigma, kappa = 0.02, 0.0005
    y = usl_curve(n, sigma, kappa) * np.exp(np.random.default_rng(8).normal(0, 0.01, n.size))
    fit = fit_usl(n, y)
    assert fit.sigma == pytest.approx(sigma, rel=0.1) and fit.kappa == pytest.approx(kappa, rel=0.1)
    assert fit.peak_n == pytest.approx(math.sqrt((1 - sigma) / kappa), rel=0.1)  # 44.3 devices
    table = usl_table(pd.DataFrame({"n_devices": n, "tokens_per_s": y, "g": "a"}), "n_devices", "tokens_per_s",
                      by=("g",))
    assert table["peak_n"].iloc[0] == pytest.approx(fit.peak_n) and table["note"].iloc[0] == ""
    # The same knee read as a power law is flagged concave.
    row = fit_table(pd.DataFrame({"n": n, "tokens_per_s": y}), "n", "tokens_per_s").iloc[0]
    assert row["curvature"] == "concave"


def test_usl_needs_four_device_counts_and_no_peak_without_coherency():
    few = usl_table(pd.DataFrame({"n": [1.0, 2, 4], "tokens_per_s": [1.0, 1.9, 3.5]}), "n", "tokens_per_s")
    assert np.isnan(few["sigma"].iloc[0]) and "too few n values" in few["note"].iloc[0]
    n = np.array([1.0, 2, 4, 8, 16])
    flat = usl_table(pd.DataFrame({"n": n, "tokens_per_s": usl_curve(n, 0.1, 0.0)}), "n", "tokens_per_s")
    assert flat["sigma"].iloc[0] == pytest.approx(0.1, abs=1e-6) and pd.isna(flat["peak_n"].iloc[0])
    # A cost is fitted as a rate: step time = 1 / throughput gives the same σ.
    cost = usl_table(pd.DataFrame({"n": n, "step_time_s": 1 / usl_curve(n, 0.1, 0.002)}), "n", "step_time_s")
    assert cost["sigma"].iloc[0] == pytest.approx(0.1, abs=1e-6) and "1/y" in cost["note"].iloc[0]


MAXTEXT = Path(__file__).parent / "data" / "maxtext_v5e_128b.csv"


def test_amdahl_when_coherency_cannot_be_identified():
    """The published MaxText v5e 128B table: κ is not identifiable, so Amdahl's law gives σ with its interval."""
    table = pd.read_csv(MAXTEXT, comment="#")
    n = table["chips"].to_numpy(dtype=float)
    x = n * table["tflops_per_chip"].to_numpy(dtype=float)
    with pytest.raises(ValueError, match="not identifiable"):
        fit_usl(n, x, model="usl")
    fit = fit_usl(n, x)
    assert fit.model == "amdahl" and fit.kappa == 0 and np.isnan(fit.kappa_ci_low) and fit.dof == len(n) - 2

    # An independent fit: scipy's curve_fit of the same model on log X.
    def log_amdahl(n_, log_lambda, sigma):
        return log_lambda + np.log(n_) - np.log(1 + sigma * (n_ - 1))

    (log_lambda, sigma), cov = optimize.curve_fit(log_amdahl, n, np.log(x), p0=[math.log(110), 1e-5])
    half = stats.t.ppf(0.975, len(n) - 2) * math.sqrt(cov[1, 1])
    assert fit.sigma == pytest.approx(sigma, rel=1e-4) and fit.lambda_ == pytest.approx(math.exp(log_lambda), rel=1e-4)
    assert (fit.sigma_ci_high - fit.sigma_ci_low) / 2 == pytest.approx(half, rel=1e-3)
    # Clear contention: 2.68e-5 [2.38e-5, 2.98e-5], within the 2.27e-5 ± 0.46e-5 read off the same table before.
    assert fit.sigma_ci_low > 0 and abs(fit.sigma - 2.27e-5) <= 0.46e-5
    row = usl_table(pd.DataFrame({"n_devices": n, "tokens_per_s": x}), "n_devices", "tokens_per_s").iloc[0]
    assert row["model"] == "amdahl" and row["sigma"] == pytest.approx(fit.sigma) and row["kappa"] == 0
    assert "Amdahl" in row["note"] and row["dof"] == 4


def test_amdahl_recovers_a_planted_contention():
    n = np.array([1, 2, 4, 8, 16, 32, 64], dtype=float)
    y = usl_curve(n, 0.03, 0.0) * np.exp(np.random.default_rng(3).normal(0, 0.01, n.size))
    fit = fit_usl(n, y, model="amdahl")
    assert fit.model == "amdahl" and fit.sigma_ci_low <= 0.03 <= fit.sigma_ci_high
    low, high = fit.prediction_interval([128.0])
    assert low[0] < usl_curve([128.0], 0.03, 0.0)[0] < high[0]
