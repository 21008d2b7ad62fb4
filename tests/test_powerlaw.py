"""powerlaw.py against planted truths and independent least-squares fits (no jax here)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from jaxscale.powerlaw import (PowerLawFit, classify_regime, curvature_test, fit_power_law, fit_table, grade,
                               joint_fit)


def planted(b: float, a: float = 2.5, sigma: float = 0.05, n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = np.geomspace(1, 1024, n)
    return x, a * x ** b * np.exp(rng.normal(0, sigma, n))


@pytest.mark.parametrize("b", [-1.2, -0.5, 0.0, 0.7, 1.0, 1.5, 2.3])
def test_planted_exponent_recovered(b):
    x, y = planted(b, seed=int(abs(b) * 10))
    fit = fit_power_law(x, y)
    # sigma 0.05 over 3 decades: the slope's standard error is ~0.007.
    assert abs(fit.exponent - b) < 0.03
    assert fit.coefficient == pytest.approx(2.5, rel=0.1)
    assert fit.ci_low < fit.exponent < fit.ci_high
    assert fit.n == 12 and fit.dof == 10


@pytest.mark.parametrize("confidence, tolerance", [(0.95, 0.015), (0.8, 0.03)])
def test_interval_coverage(confidence, tolerance):
    rng = np.random.default_rng(1234)
    x = np.array([1, 2, 3, 4, 6, 8, 12, 16], dtype=float)
    b = 0.8
    covered = 0
    trials = 2000
    for _ in range(trials):
        y = 3.0 * x ** b * np.exp(rng.normal(0, 0.1, x.size))
        fit = fit_power_law(x, y, confidence=confidence)
        covered += fit.ci_low <= b <= fit.ci_high
    # Binomial sd of the rate is 0.005 (0.95) and 0.009 (0.8); tolerances are ~3 sd.
    assert abs(covered / trials - confidence) < tolerance


def test_matches_independent_least_squares():
    rng = np.random.default_rng(7)
    x = rng.uniform(1, 500, 15)
    y = 0.3 * x ** -0.6 * np.exp(rng.normal(0, 0.2, 15))
    fit = fit_power_law(x, y, confidence=0.9)
    design = np.column_stack([np.ones(15), np.log(x)])
    (intercept, slope), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    ref = stats.linregress(np.log(x), np.log(y))
    assert fit.exponent == pytest.approx(slope, abs=1e-6)
    assert fit.coefficient == pytest.approx(math.exp(intercept), rel=1e-6)
    assert fit.stderr == pytest.approx(ref.stderr, rel=1e-6)
    assert fit.r2 == pytest.approx(ref.rvalue ** 2, abs=1e-6)
    half = stats.t.ppf(0.95, 13) * ref.stderr
    assert (fit.ci_low, fit.ci_high) == pytest.approx((ref.slope - half, ref.slope + half), abs=1e-6)
    resid = np.log(y) - design @ np.array([intercept, slope])
    assert fit.residual_std == pytest.approx(math.sqrt(resid @ resid / 13), rel=1e-6)


def test_mean_band_matches_design_matrix_formula():
    x, y = planted(0.5, sigma=0.2, n=9, seed=3)
    fit = fit_power_law(x, y)
    design = np.column_stack([np.ones(9), np.log(x)])
    inv = np.linalg.inv(design.T @ design)
    x0 = np.array([3.0, 700.0])
    rows = np.column_stack([np.ones(2), np.log(x0)])
    se = fit.residual_std * np.sqrt(np.einsum("ij,jk,ik->i", rows, inv, rows))
    t = stats.t.ppf(0.975, 7)
    center = np.log(fit.coefficient) + fit.exponent * np.log(x0)
    low, high = fit.mean_band(x0)
    np.testing.assert_allclose(np.log(low), center - t * se, atol=1e-9)
    np.testing.assert_allclose(np.log(high), center + t * se, atol=1e-9)


def test_exact_data_collapses_interval():
    x = np.array([1.0, 2, 4, 8])
    fit = fit_power_law(x, 5 * x ** -1.0)
    assert fit.exponent == pytest.approx(-1.0, abs=1e-12)
    assert fit.stderr == pytest.approx(0.0, abs=1e-12)
    assert fit.ci_high - fit.ci_low == pytest.approx(0.0, abs=1e-10)
    assert classify_regime(fit.ci_low, fit.ci_high, -1.0) == "linear"


@pytest.mark.parametrize("x, y, message", [
    ([1, 2], [1, 2], "at least 3 points"),
    ([4, 4, 4], [1, 2, 3], "single distinct value"),
    ([0, 1, 2], [1, 2, 3], "positive"),
    ([1, 2, 3], [1, -2, 3], "positive"),
    ([1, 2, np.nan], [1, 2, 3], "finite"),
    ([1, 2, 3], [1, np.inf, 3], "finite"),
    ([1, 2, 3, 4], [1, 2, 3], "different lengths"),
])
def test_fit_power_law_rejects_bad_input(x, y, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, y)


def test_fit_power_law_rejects_bad_confidence():
    with pytest.raises(ValueError, match="confidence"):
        fit_power_law([1, 2, 3], [1, 2, 3], confidence=1.0)


def test_from_row_round_trips():
    x, y = planted(1.3, seed=5)
    fit = fit_power_law(x, y)
    row = fit_table(pd.DataFrame({"x": x, "y": y}), "x", "y").iloc[0]
    assert PowerLawFit.from_row(row) == fit


def test_fit_table_groups_drops_and_notes():
    x = np.array([1, 2, 4, 8, 16], dtype=float)
    good = pd.DataFrame({"g": "a", "x": x, "y": 2 * x ** 0.5, "status": "ok"})
    failed = pd.DataFrame({"g": ["a", "a", "a"], "x": [32.0, 64, 128], "y": ["", "nan", "-1"],
                           "status": ["oom", "ok", "ok"]})
    few = pd.DataFrame({"g": "b", "x": [1.0, 2], "y": [1.0, 2], "status": "ok"})
    same_x = pd.DataFrame({"g": "c", "x": [4.0, 4, 4], "y": [1.0, 2, 3], "status": "ok"})
    df = pd.concat([good, failed, few, same_x], ignore_index=True)
    df["y"] = df["y"].astype(str)  # numbers arriving as text must be coerced
    out = fit_table(df, "x", "y", by=("g",)).set_index("g")
    assert out.loc["a", "exponent"] == pytest.approx(0.5, abs=1e-9)
    assert out.loc["a", "n_points"] == 5 and out.loc["a", "n_dropped"] == 3
    assert out.loc["a", "note"] == ""
    for group, why in (("b", "at least 3"), ("c", "single distinct")):
        assert np.isnan(out.loc[group, "exponent"])
        assert why in out.loc[group, "note"]
        assert out.loc[group, "regime"] == ""
    assert list(out.columns[:5]) == ["by", "x", "y", "exponent", "stderr"]


def test_fit_table_ideal_forms_and_missing_columns():
    x, y = planted(1.0, seed=11)
    df = pd.DataFrame({"x": x, "y": y, "z": y * x})
    assert fit_table(df, "x", ["y"])["ideal_exponent"].iloc[0] == 1.0
    assert fit_table(df, "x", ["y"], ideal=2.0)["regime"].iloc[0] == "sublinear"
    out = fit_table(df, "x", ["y", "z"], ideal=lambda key, xc, yc: 2.0 if yc == "z" else None)
    assert np.isnan(out["ideal_exponent"].iloc[0]) and out["regime"].iloc[0] == ""
    assert out["ideal_exponent"].iloc[1] == 2.0 and out["regime"].iloc[1] == "linear"
    with pytest.raises(ValueError, match="not found"):
        fit_table(df, "x", "missing")


@pytest.mark.parametrize("b, regime", [(0.5, "sublinear"), (1.0, "linear"), (1.6, "superlinear")])
def test_regime_on_planted_data(b, regime):
    x, y = planted(b, sigma=0.05, seed=21)
    out = fit_table(pd.DataFrame({"x": x, "y": y}), "x", "y", ideal=1.0)
    assert out["regime"].iloc[0] == regime


def test_classify_regime_boundaries():
    # Band 1 ± 0.05: inside, wholly outside on either side, or inconclusive (empty regime).
    assert classify_regime(0.96, 1.04, 1.0) == "linear"
    assert classify_regime(0.95, 1.05, 1.0) == "linear"  # the edges belong to the band
    assert classify_regime(0.9, 1.1, 1.0) == ""  # wider than the band
    assert classify_regime(1.0, 1.2, 1.0) == ""  # straddles the upper edge
    assert classify_regime(0.5, 0.9, 1.0) == "sublinear"
    assert classify_regime(1.06, 1.2, 1.0) == "superlinear"
    assert classify_regime(1.01, 1.2, 1.0, tolerance=0.0) == "superlinear"
    assert classify_regime(0.9, 1.1, None) == ""
    assert classify_regime(math.nan, math.nan, 1.0) == ""


def test_joint_fit_recovers_planted_exponents():
    rng = np.random.default_rng(5)
    rows = []
    for strategy, (alpha, beta) in {"fsdp": (1.1, -0.85), "dp": (0.9, -0.6)}.items():
        for p in (1e6, 4e6, 1.6e7, 6.4e7, 2.56e8):
            for n in (1, 2, 4, 8):
                rows.append({"strategy": strategy, "params": p, "n_devices": n, "status": "ok",
                             "step_time_s": 1e-8 * p ** alpha * n ** beta * math.exp(rng.normal(0, 0.05))})
    rows.append({"strategy": "dp", "params": 1e9, "n_devices": 8, "status": "oom", "step_time_s": np.nan})
    out = joint_fit(pd.DataFrame(rows), "step_time_s").set_index("strategy")
    for strategy, (alpha, beta) in {"fsdp": (1.1, -0.85), "dp": (0.9, -0.6)}.items():
        r = out.loc[strategy]
        assert abs(r["exponent_params"] - alpha) < 0.03 and abs(r["exponent_n_devices"] - beta) < 0.05
        assert r["ci_low_params"] < alpha < r["ci_high_params"]
        assert r["ci_low_n_devices"] < beta < r["ci_high_n_devices"]
        assert r["n_points"] == 20 and r["note"] == ""
    assert out.loc["dp", "n_dropped"] == 1 and out.loc["fsdp", "n_dropped"] == 0


def test_joint_fit_degenerate_groups_get_notes():
    n = np.array([1, 2, 4, 8, 16], dtype=float)
    df = pd.concat([
        pd.DataFrame({"strategy": "single", "params": 1e6, "n_devices": n, "step_time_s": 1 / n}),
        pd.DataFrame({"strategy": "collinear", "params": 1e6 * n ** 2, "n_devices": n, "step_time_s": n}),
        pd.DataFrame({"strategy": "few", "params": [1e6, 2e6, 4e6], "n_devices": [1, 2, 1], "step_time_s": 1.0}),
    ])
    out = joint_fit(df, "step_time_s").set_index("strategy")
    assert "params takes a single value" in out.loc["single", "note"]
    assert "collinear" in out.loc["collinear", "note"]
    assert "at least 4" in out.loc["few", "note"]
    assert out["exponent_params"].isna().all()


def test_joint_fit_with_one_x_matches_linregress():
    x, y = planted(-0.7, sigma=0.15, n=11, seed=4)
    ref = stats.linregress(np.log(x), np.log(y))
    out = joint_fit(pd.DataFrame({"n": x, "t": y}), "t", xs=("n",), by=(), confidence=0.9).iloc[0]
    assert out["exponent_n"] == pytest.approx(ref.slope, abs=1e-6)
    assert out["stderr_n"] == pytest.approx(ref.stderr, rel=1e-6)
    assert out["r2"] == pytest.approx(ref.rvalue ** 2, abs=1e-6)
    assert out["ci_high_n"] - out["exponent_n"] == pytest.approx(stats.t.ppf(0.95, 9) * ref.stderr, rel=1e-6)


# ------------------------------------------------------------------ verdicts with a tolerance


def _fit_one(b: float, y: str, ideal: float, sigma: float = 0.01, n: int = 12, seed: int = 3,
             tolerance: float = 0.05) -> pd.Series:
    x, values = planted(b, sigma=sigma, n=n, seed=seed)
    return fit_table(pd.DataFrame({"x": x, y: values}), "x", y, ideal=ideal, tolerance=tolerance).iloc[0]


@pytest.mark.parametrize("b, y, ideal, assessment, regime", [
    (-1.0, "step_time_s", -1.0, "as ideal", "linear"),
    (-0.98, "step_time_s", -1.0, "as ideal", "linear"),  # 2% off the ideal: inside the practical band
    (-1.3, "step_time_s", -1.0, "better than ideal", "superlinear"),
    (-0.7, "step_time_s", -1.0, "worse than ideal", "sublinear"),
    (1.3, "tokens_per_s", 1.0, "better than ideal", "superlinear"),
    (0.7, "tokens_per_s", 1.0, "worse than ideal", "sublinear"),
    (0.4, "state_bytes", 0.0, "worse than ideal", "sublinear"),
    (1.3, "model_flops_per_step", 1.0, "above ideal", "superlinear"),  # no better direction
    (0.7, "model_flops_per_step", 1.0, "below ideal", "sublinear"),
])
def test_verdicts_on_planted_data(b, y, ideal, assessment, regime):
    r = _fit_one(b, y, ideal)
    assert (r["assessment"], r["regime"]) == (assessment, regime), r[["exponent", "ci_low", "ci_high"]]
    assert r["tolerance"] == 0.05


def test_inconclusive_verdicts_say_why():
    wide = _fit_one(-1.0, "step_time_s", -1.0, sigma=0.5, n=4)  # noisy, 2 dof: an interval far wider than ±0.05
    assert wide["assessment"] == "inconclusive" and wide["regime"] == ""
    assert "wider than the band" in wide["note"]
    edge = _fit_one(-0.95, "step_time_s", -1.0, sigma=0.002)  # planted on the band's edge, a narrow interval
    assert edge["ci_low"] < -0.95 < edge["ci_high"] and edge["ci_high"] - edge["ci_low"] < 0.1
    assert edge["assessment"] == "inconclusive" and "straddles" in edge["note"]
    few = fit_table(pd.DataFrame({"n": [1.0, 2.0], "step_time_s": [1.0, 0.5]}), "n", "step_time_s", ideal=-1.0)
    assert few["assessment"].iloc[0] == "inconclusive" and "too few points" in few["note"].iloc[0]
    # A looser tolerance turns the same edge fit into "as ideal".
    assert _fit_one(-0.95, "step_time_s", -1.0, sigma=0.002, tolerance=0.1)["assessment"] == "as ideal"


@pytest.mark.parametrize("lo, hi, ideal, tol, direction, expected", [
    (-1.02, -0.97, -1, 0.05, "lower", "as ideal"),
    (-0.94, -0.90, -1, 0.05, "lower", "worse than ideal"),
    (-1.20, -1.06, -1, 0.05, "lower", "better than ideal"),
    (0.96, 0.99, 1, 0.05, "higher", "as ideal"),
    (0.80, 0.94, 1, 0.05, "higher", "worse than ideal"),
    (0.90, 1.10, 1, 0.05, "higher", "inconclusive"),
    (0.97, 1.07, 1, 0.05, "higher", "inconclusive"),
    (0.97, 1.07, 1, 0.10, "higher", "as ideal"),
])
def test_grade_by_hand(lo, hi, ideal, tol, direction, expected):
    assert grade(lo, hi, ideal, tol, direction).assessment == expected


def test_pure_power_laws_are_not_flagged_curved():
    x = np.array([1.0, 2, 4, 8, 16, 32, 64])
    assert curvature_test(x, 3 * x ** 0.8).label == ""  # exact: no bend at all
    rng = np.random.default_rng(11)
    flagged = sum(curvature_test(x, 3 * x ** 0.8 * np.exp(rng.normal(0, 0.02, x.size))).label != ""
                  for _ in range(200))
    assert flagged <= 20  # a 5% test with a practical threshold: at most ~5% false alarms (10/200 ± 3 sd)
    assert curvature_test(x, 3 * x ** 0.8 * np.exp(0.05 * np.log(x) ** 2)).label == "convex"


def test_prediction_interval_coverage():
    rng = np.random.default_rng(5)
    n = np.array([1.0, 2, 4, 8, 16])
    hits = 0
    for _ in range(300):
        y = 50 * n ** -0.9 * np.exp(rng.normal(0, 0.05, n.size))
        fit = fit_power_law(n, y)
        low, high = fit.prediction_interval(64.0)
        hits += low <= 50 * 64.0 ** -0.9 * math.exp(rng.normal(0, 0.05)) <= high
    assert abs(hits / 300 - 0.95) < 0.038
