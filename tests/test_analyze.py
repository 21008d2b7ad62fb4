"""analyze.py against planted truths and independent least-squares fits (no jax here)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from jaxscale.analyze import (PowerLawFit, add_memory_column, check_expectation, classify_regime, default_fits,
                              fit_points, fit_power_law, fit_table, joint_fit, parse_expectation, scaling_efficiency)


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
    assert classify_regime(0.9, 1.1, 1.0) == "linear"
    assert classify_regime(1.0, 1.2, 1.0) == "linear"
    assert classify_regime(0.5, 0.9, 1.0) == "sublinear"
    assert classify_regime(1.01, 1.2, 1.0) == "superlinear"
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


def make_runs(seed: int = 0) -> pd.DataFrame:
    """runs.csv-like rows with planted scaling.

    Strong scaling: step time ∝ params / n^0.9 (so tokens/s ∝ n^0.9); weak
    scaling: step time ∝ params · n^0 . Memory: dp flat, sharded strategies ∝ 1/n.
    """
    rng = np.random.default_rng(seed)
    sizes = {"s": (256, 4, 4, 1024), "m": (512, 8, 8, 2048), "l": (1024, 12, 16, 4096)}
    rows = []
    for mode, time_exp in (("strong", -0.9), ("weak", 0.0)):
        for strategy in ("dp", "fsdp", "tp"):
            for name, (d, layers, heads, ff) in sizes.items():
                params = 12 * layers * d * d
                for n in (1, 2, 4, 8):
                    noise = np.exp(rng.normal(0, 0.01, 3))
                    step = 2e-9 * params * n ** time_exp * noise[0]
                    mem = 20.0 * params * (1 if strategy == "dp" else 1 / n) * noise[1]
                    batch = 16 if mode == "strong" else 4 * n
                    rows.append({
                        "status": "ok", "size_name": name, "d_model": d, "n_layers": layers, "n_heads": heads,
                        "d_ff": ff, "seq_len": 128, "vocab": 512, "strategy": strategy, "n_devices": n,
                        "global_batch": batch, "batch_mode": mode, "dtype": "float32", "params": params,
                        "step_time_s": step, "tokens_per_s": batch * 128 / step, "compiled_total_bytes": mem,
                        "peak_bytes_in_use": "", "compiled_argument_bytes": 0.7 * mem * noise[2],
                        "model_flops_per_step": 6.0 * params * batch * 128,
                        "all_gather_bytes": 4.0 * params * (n - 1) / n if strategy == "fsdp" else 0.0,
                    })
    rows.append({**rows[0], "status": "oom", "step_time_s": "", "tokens_per_s": "", "n_devices": 16})
    return pd.DataFrame(rows)


def test_default_fits_families_ideals_and_regimes():
    fits = default_fits(make_runs())
    assert set(fits["family"]) == {"devices", "communication", "model_size"}
    dev = fits[fits["family"] == "devices"].set_index(["size_name", "strategy", "batch_mode", "y"])
    assert len(dev) == 3 * 3 * 2 * 4
    expected = {  # (strategy, mode, y) -> (ideal, regime, assessment) for the planted data
        ("fsdp", "strong", "step_time_s"): (-1, "superlinear", "worse than ideal"),
        ("fsdp", "strong", "tokens_per_s"): (1, "sublinear", "worse than ideal"),
        ("tp", "weak", "step_time_s"): (0, "linear", "as ideal"),
        ("dp", "weak", "tokens_per_s"): (1, "linear", "as ideal"),
        ("dp", "strong", "memory_per_device_bytes"): (0, "linear", "as ideal"),
        ("fsdp", "strong", "memory_per_device_bytes"): (-1, "linear", "as ideal"),
        ("tp", "weak", "compiled_argument_bytes"): (-1, "linear", "as ideal"),
    }
    for (strategy, mode, y), (ideal, regime, assessment) in expected.items():
        for size in ("s", "m", "l"):
            r = dev.loc[(size, strategy, mode, y)]
            assert (r["ideal_exponent"], r["regime"], r["assessment"]) == (ideal, regime, assessment)
    strong_time = dev.loc[("m", "fsdp", "strong", "step_time_s")]
    assert abs(strong_time["exponent"] + 0.9) < 0.05
    # The failed n=16 row belongs to (s, dp, strong) and is counted there only.
    assert dev.loc[("s", "dp", "strong", "step_time_s"), "n_dropped"] == 1
    assert dev.loc[("m", "dp", "strong", "step_time_s"), "n_dropped"] == 0

    comm = fits[fits["family"] == "communication"]
    assert set(comm["strategy"]) == {"fsdp"}  # dp and tp never all-gather: no rows
    assert comm["ideal_exponent"].isna().all() and (comm["regime"] == "").all()

    size = fits[fits["family"] == "model_size"]
    assert set(size["y"]) == {"step_time_s", "memory_per_device_bytes", "model_flops_per_step"}
    fitted = size[size["exponent"].notna()]
    assert (fitted["ideal_exponent"] == 1).all()
    assert (abs(fitted["exponent"] - 1) < 0.06).all()
    assert (fitted.loc[fitted["y"] == "model_flops_per_step", "regime"] == "linear").all()
    assert size["size_name"].isna().all() and size["n_devices"].notna().all()


def test_default_fits_on_a_foreign_frame():
    x, y = planted(-1.0, seed=2)
    fits = default_fits(pd.DataFrame({"n_devices": x, "step_time_s": y}))
    assert list(fits["family"]) == ["devices"]
    assert fits["regime"].iloc[0] == ""  # no batch_mode, so no ideal for step time
    assert default_fits(pd.DataFrame({"a": [1, 2]})).empty


def test_add_memory_column_prefers_measured_peak():
    df = pd.DataFrame({"peak_bytes_in_use": ["", "0", "500", None], "compiled_total_bytes": [100, 200, 300, ""]})
    out = add_memory_column(df)
    np.testing.assert_array_equal(out["memory_per_device_bytes"], [100, 200, 500, np.nan])
    assert list(out["memory_source"]) == ["compiled_total_bytes", "compiled_total_bytes", "peak_bytes_in_use", ""]
    assert add_memory_column(pd.DataFrame({"a": [1]}))["memory_per_device_bytes"].isna().all()
    assert "memory_per_device_bytes" not in df.columns


def test_scaling_efficiency_planted():
    n = np.array([2, 4, 8, 16])
    df = pd.concat([
        pd.DataFrame({"strategy": "dp", "n_devices": n, "tokens_per_s": 1000 * n ** 0.9, "status": "ok"}),
        pd.DataFrame({"strategy": "tp", "n_devices": [1, 2, 4, 4], "tokens_per_s": [100, 150, 200, 400],
                      "status": ["ok", "ok", "ok", "oom"]}),
    ])
    out = scaling_efficiency(df, by=("strategy",))
    dp = out[out["strategy"] == "dp"]
    np.testing.assert_allclose(dp["efficiency"], (n / 2) ** -0.1, rtol=1e-12)
    assert (dp["base_n_devices"] == 2).all()
    tp = out[out["strategy"] == "tp"].set_index("n_devices")["efficiency"]
    np.testing.assert_allclose(tp.to_numpy(), [1.0, 0.75, 0.5])  # the oom row at n=4 is ignored


@pytest.mark.parametrize("text, parsed", [
    ("step_time_s:params=1.5", ("step_time_s", "params", 1.5)),
    (" tokens_per_s : n_devices = -1 ", ("tokens_per_s", "n_devices", -1.0)),
    ("y:x=2e-1", ("y", "x", 0.2)),
])
def test_parse_expectation(text, parsed):
    assert parse_expectation(text) == parsed


@pytest.mark.parametrize("text", ["step_time_s", "a:b", "a:b=", ":b=1", "a:=1", "a:b=x", "a:b=nan", "a:b=1=2"])
def test_parse_expectation_rejects_malformed(text):
    with pytest.raises(ValueError, match="Y:X=EXPONENT|not a number|finite"):
        parse_expectation(text)


def test_check_expectation_on_rows_and_on_fits():
    x, y = planted(1.0, sigma=0.1, n=10, seed=9)
    df = pd.DataFrame({"params": x, "step_time_s": y, "strategy": "fsdp"})
    ref = stats.linregress(np.log(x), np.log(y))
    verdicts = {}
    for claim in (0.9, 1.0, 1.1, 1.5):
        out = check_expectation(df, "step_time_s", "params", claim, by=("strategy",))
        t = (ref.slope - claim) / ref.stderr
        p = 2 * stats.t.sf(abs(t), 8)
        assert out["t_stat"].iloc[0] == pytest.approx(t, rel=1e-6)
        assert out["p_value"].iloc[0] == pytest.approx(p, rel=1e-6)
        assert bool(out["rejected"].iloc[0]) == (p < 0.05)
        assert out["strategy"].iloc[0] == "fsdp"
        from_fits = check_expectation(fit_table(df, "params", "step_time_s", by=("strategy",)), "step_time_s",
                                      "params", claim)
        assert bool(from_fits["rejected"].iloc[0]) == (p < 0.05)
        assert from_fits["ci_low"].iloc[0] == pytest.approx(out["ci_low"].iloc[0])
        verdicts[claim] = bool(out["rejected"].iloc[0])
    assert verdicts[1.5] and not verdicts[1.0]
    missing = check_expectation(fit_table(df, "params", "step_time_s"), "tokens_per_s", "params", 1.0)
    assert missing["rejected"].iloc[0] is None and "no fit" in missing["note"].iloc[0]


def test_fit_points_selects_the_group():
    runs = make_runs()
    fits = default_fits(runs)
    row = fits[(fits["family"] == "devices") & (fits["size_name"] == "s") & (fits["strategy"] == "dp")
               & (fits["batch_mode"] == "strong") & (fits["y"] == "memory_per_device_bytes")].iloc[0]
    points = fit_points(runs, row)
    assert sorted(points["x"]) == [1, 2, 4, 8]
    assert len(points) == row["n_points"]


def test_joint_fit_with_one_x_matches_linregress():
    x, y = planted(-0.7, sigma=0.15, n=11, seed=4)
    ref = stats.linregress(np.log(x), np.log(y))
    out = joint_fit(pd.DataFrame({"n": x, "t": y}), "t", xs=("n",), by=(), confidence=0.9).iloc[0]
    assert out["exponent_n"] == pytest.approx(ref.slope, abs=1e-6)
    assert out["stderr_n"] == pytest.approx(ref.stderr, rel=1e-6)
    assert out["r2"] == pytest.approx(ref.rvalue ** 2, abs=1e-6)
    assert out["ci_high_n"] - out["exponent_n"] == pytest.approx(stats.t.ppf(0.95, 9) * ref.stderr, rel=1e-6)
