"""analyze.py against planted truths and independent least-squares fits (no jax here)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from jaxscale import analyze, families
from jaxscale.analyze import (check_expectation, default_fits, default_joint_fit, parse_expectation, plan_vs_measured,
                              predict_table, scaling_efficiency)
from jaxscale.families import add_memory_column, fit_points
from jaxscale.powerlaw import (PowerLawFit, classify_regime, curvature_test, fit_power_law, fit_table, grade,
                               joint_fit)
from jaxscale.usl import fit_usl, usl_table
from jaxscale.records import COLUMNS


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


def make_runs(seed: int = 0, backend: str = "gpu") -> pd.DataFrame:
    """runs.csv-like rows with planted scaling.

    Strong scaling: step time ∝ params / n^0.8 (so tokens/s ∝ n^0.8); weak
    scaling: step time ∝ params · n^0. State (params + Adam, 12 bytes per
    param): whole on every device for dp, 1/n for fsdp and tp. Activations ∝ the
    batch one device holds: 1/n strong and constant weak for dp and fsdp; tp
    replicates the batch and splits part of them (∝ n^-0.5 here).
    """
    rng = np.random.default_rng(seed)
    sizes = {"s": (256, 4, 4, 1024), "m": (512, 8, 8, 2048), "l": (1024, 12, 16, 4096)}
    rows = []
    for mode, time_exp in (("strong", -0.8), ("weak", 0.0)):
        for strategy in ("dp", "fsdp", "tp"):
            for name, (d, layers, heads, ff) in sizes.items():
                params = 12 * layers * d * d
                for n in (1, 2, 4, 8):
                    noise = np.exp(rng.normal(0, 0.003, 3))
                    step = 2e-9 * params * n ** time_exp * noise[0]
                    batch = 16 if mode == "strong" else 4 * n
                    state = 12.0 * params / (1 if strategy == "dp" else n)
                    per_device_batch = batch if strategy == "tp" else batch / n
                    act = 3e3 * d * layers * per_device_batch * (n ** -0.5 * n / batch * 16 if strategy == "tp"
                                                                 else 1) * noise[1]
                    rows.append({
                        "status": "ok", "backend": backend, "size_name": name, "d_model": d, "n_layers": layers,
                        "n_heads": heads, "d_ff": ff, "seq_len": 128, "vocab": 512, "strategy": strategy,
                        "n_devices": n, "mesh_shape": f"data:{1 if strategy == 'tp' else n},model:"
                                                      f"{n if strategy == 'tp' else 1}",
                        "global_batch": batch, "batch_mode": mode, "dtype": "float32", "params": params,
                        "step_time_s": step, "tokens_per_s": batch * 128 / step, "param_bytes": state / 3,
                        "opt_state_bytes": 2 * state / 3, "compiled_total_bytes": state + act,
                        "peak_bytes_in_use": "", "compiled_argument_bytes": 1.01 * state * noise[2],
                        "model_flops_per_step": 6.0 * params * batch * 128,
                        "all_gather_bytes": 4.0 * params * (n - 1) / n if strategy == "fsdp" else 0.0,
                    })
    rows.append({**rows[0], "status": "oom", "step_time_s": "", "tokens_per_s": "", "n_devices": 16,
                 "mesh_shape": "data:16,model:1"})
    return pd.DataFrame(rows)


# (strategy, batch mode, y) -> ideal exponent against n_devices; None: no single ideal.
MEMORY_IDEALS = {
    ("dp", "strong", "state_bytes"): 0, ("dp", "weak", "state_bytes"): 0,
    ("fsdp", "strong", "state_bytes"): -1, ("fsdp", "weak", "state_bytes"): -1,
    ("tp", "strong", "state_bytes"): -1, ("tp", "weak", "state_bytes"): -1,
    ("dp", "strong", "activation_bytes"): -1, ("dp", "weak", "activation_bytes"): 0,
    ("fsdp", "strong", "activation_bytes"): -1, ("fsdp", "weak", "activation_bytes"): 0,
    ("tp", "strong", "activation_bytes"): None, ("tp", "weak", "activation_bytes"): None,
}


def test_default_fits_families_ideals_and_regimes():
    fits = default_fits(make_runs())
    assert set(fits["family"]) == {"devices", "communication", "model_size"}
    dev = fits[fits["family"] == "devices"].set_index(["size_name", "strategy", "batch_mode", "y"])
    # step time, throughput, state and activations; the total only where state is unknown (never here).
    assert len(dev) == 3 * 3 * 2 * 4 and "memory_per_device_bytes" not in set(fits["y"])
    expected = {  # (strategy, mode, y) -> (ideal, assessment, regime) for the planted data
        ("fsdp", "strong", "step_time_s"): (-1, "worse than ideal", "sublinear"),
        ("fsdp", "strong", "tokens_per_s"): (1, "worse than ideal", "sublinear"),
        ("tp", "weak", "step_time_s"): (0, "as ideal", "linear"),
        ("dp", "weak", "tokens_per_s"): (1, "as ideal", "linear"),
    }
    for (strategy, mode, y), (ideal, assessment, regime) in expected.items():
        for size in ("s", "m", "l"):
            r = dev.loc[(size, strategy, mode, y)]
            assert (r["ideal_exponent"], r["assessment"], r["regime"]) == (ideal, assessment, regime)
    strong_time = dev.loc[("m", "fsdp", "strong", "step_time_s")]
    assert abs(strong_time["exponent"] + 0.8) < 0.05
    # The failed n=16 row belongs to (s, dp, strong) and is counted there only.
    assert dev.loc[("s", "dp", "strong", "step_time_s"), "n_dropped"] == 1
    assert dev.loc[("m", "dp", "strong", "step_time_s"), "n_dropped"] == 0

    comm = fits[fits["family"] == "communication"]
    assert set(comm["strategy"]) == {"fsdp"}  # dp and tp never all-gather: no rows
    assert comm["ideal_exponent"].isna().all() and (comm["assessment"] == "").all()

    size = fits[fits["family"] == "model_size"]
    assert set(size["y"]) == {"step_time_s", "state_bytes", "activation_bytes", "model_flops_per_step"}
    graded = size[size["y"] != "activation_bytes"]
    assert (graded["ideal_exponent"] == 1).all() and size.loc[size["y"] == "activation_bytes",
                                                              "ideal_exponent"].isna().all()
    # Planted: step time, state and model FLOPs exactly ∝ params (up to 1% noise on time).
    assert (graded["assessment"] == "as ideal").all(), graded[["y", "exponent", "ci_low", "ci_high", "note"]]
    assert size["size_name"].isna().all() and size["n_devices"].notna().all()


@pytest.mark.parametrize("strategy, mode, y", sorted(MEMORY_IDEALS))
def test_memory_ideal_per_strategy_and_batch_mode(strategy, mode, y):
    fits = default_fits(make_runs())
    rows = fits[(fits["family"] == "devices") & (fits["strategy"] == strategy) & (fits["batch_mode"] == mode)
                & (fits["y"] == y)]
    assert len(rows) == 3  # one per model size
    ideal = MEMORY_IDEALS[(strategy, mode, y)]
    if ideal is None:
        assert rows["ideal_exponent"].isna().all() and (rows["assessment"] == "").all()
        assert rows["note"].str.contains("no single ideal").all()
    else:
        assert (rows["ideal_exponent"] == ideal).all()
        # The planted memory follows each ideal, so every verdict is "as ideal".
        assert (rows["assessment"] == "as ideal").all(), rows[["exponent", "ci_low", "ci_high", "note"]]
        assert (rows["direction"] == "lower is better").all()


def test_memory_that_misses_its_ideal_is_graded():
    runs = make_runs()
    # dp under strong scaling, but activations that do not shrink: worse than the ideal −1.
    dp_strong = (runs["strategy"] == "dp") & (runs["batch_mode"] == "strong")
    state = runs["param_bytes"] + runs["opt_state_bytes"]
    runs.loc[dp_strong, "compiled_total_bytes"] = state[dp_strong] + 1e6 * runs.loc[dp_strong, "n_devices"] ** -0.5
    fits = default_fits(runs)
    rows = fits[(fits["strategy"] == "dp") & (fits["batch_mode"] == "strong") & (fits["y"] == "activation_bytes")
                & (fits["family"] == "devices")]
    assert (rows["assessment"] == "worse than ideal").all() and (rows["regime"] == "sublinear").all()
    assert np.allclose(rows["exponent"], -0.5)


def test_virtual_cpu_devices_are_not_graded_on_speed():
    fits = default_fits(make_runs(backend="cpu"))
    dev = fits[fits["family"] == "devices"]
    speed = dev[dev["y"].isin(["step_time_s", "tokens_per_s"])]
    assert (speed["assessment"] == "not applicable").all() and (speed["regime"] == "").all()
    assert speed["note"].str.contains("share one host's cores").all()
    memory = dev[dev["y"] == "state_bytes"]
    assert (memory["assessment"] == "as ideal").all()  # memory is still graded on the CPU
    joint = default_joint_fit(make_runs(backend="cpu"))
    assert (joint["assessment_n_devices"] == "not applicable").all()
    assert (joint["assessment_params"] != "not applicable").all()
    eff = scaling_efficiency(make_runs(backend="cpu"))
    assert eff["note"].str.contains("share one host's cores").all()
    assert (scaling_efficiency(make_runs())["note"] == "").all()


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
               & (fits["batch_mode"] == "strong") & (fits["y"] == "state_bytes")].iloc[0]
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


@pytest.mark.parametrize("b_time", [-1.3, -1.0, -0.97, -0.8, -0.5, -0.25, 0.0])
def test_step_time_and_throughput_of_the_same_points_agree(b_time):
    rng = np.random.default_rng(int(-b_time * 100))
    n = np.array([1.0, 2, 4, 8, 16, 32])
    step = 0.5 * n ** b_time * np.exp(rng.normal(0, 0.01, n.size))
    df = pd.DataFrame({"n_devices": n, "step_time_s": step, "tokens_per_s": 4096 / step, "batch_mode": "strong"})
    out = fit_table(df, "n_devices", ["step_time_s", "tokens_per_s"], by=("batch_mode",),
                    ideal=analyze.devices_ideal).set_index("y")
    assert out.loc["step_time_s", "exponent"] == pytest.approx(-out.loc["tokens_per_s", "exponent"])
    assert out.loc["step_time_s", "assessment"] == out.loc["tokens_per_s", "assessment"]
    assert out.loc["step_time_s", "regime"] == out.loc["tokens_per_s", "regime"]


def test_expectations_use_the_tolerance():
    x, y = planted(1.0, sigma=0.01, n=12, seed=9)
    df = pd.DataFrame({"params": x, "step_time_s": y})
    verdict = {claim: check_expectation(df, "step_time_s", "params", claim, by=()).iloc[0]
               for claim in (1.0, 1.02, 1.5, 0.5, 1.05)}
    assert verdict[1.0]["assessment"] == "as expected"
    assert verdict[1.02]["assessment"] == "as expected"  # the t test rejects 2%, the tolerance does not
    assert bool(verdict[1.02]["rejected"])
    assert verdict[1.5]["assessment"] == "below expected" and verdict[0.5]["assessment"] == "above expected"
    assert verdict[1.05]["assessment"] == "inconclusive" and "straddles" in verdict[1.05]["note"]
    wide = check_expectation(df.iloc[:3].assign(step_time_s=[1.0, 3.0, 1.5]), "step_time_s", "params", 1.0, by=())
    assert wide["assessment"].iloc[0] == "inconclusive" and "wider" in wide["note"].iloc[0]


def test_model_size_and_joint_verdicts():
    runs = make_runs()
    joint = default_joint_fit(runs).set_index(["strategy", "batch_mode"])
    # Planted: step time ∝ params · n^-0.8 (strong) or n^0 (weak).
    assert (joint["assessment_params"] == "as ideal").all()
    assert (joint.xs("strong", level="batch_mode")["assessment_n_devices"] == "worse than ideal").all()
    assert (joint.xs("weak", level="batch_mode")["assessment_n_devices"] == "as ideal").all()
    assert (joint["ideal_params"] == 1).all()
    p, n = np.array([1.0, 2, 4, 8, 16, 32]), np.array([1.0, 2, 1, 2, 1, 2])
    t = p * n * np.exp(np.random.default_rng(3).normal(0, 0.5, 6))  # noisy: both intervals far wider than ±0.05
    wide = joint_fit(pd.DataFrame({"p": p, "n": n, "t": t}), "t", ("p", "n"), by=(), ideals=lambda key, x, y: 1.0)
    assert (wide[["assessment_p", "assessment_n"]] == "inconclusive").all(axis=None)


# ------------------------------------------------------------------ grouping


def test_every_row_column_is_classified():
    linked = {c for cs in families.X_LINKED.values() for c in cs}
    unclassified = set(COLUMNS) - set(families.CONFIG_COLUMNS) - families.NON_CONFIG_COLUMNS - linked
    assert not unclassified, f"say whether these split a fit (families.CONFIG_COLUMNS) or not: {unclassified}"


@pytest.mark.parametrize("column, values", [
    ("backend", ("cpu", "gpu")), ("device_kind", ("cpu", "NVIDIA H100")), ("remat", ("none", "full")),
    ("attention", ("xla", "cudnn")), ("xla_flags", ("", "--xla_foo")), ("scan_layers", ("true", "false")),
    ("row_source", ("measured", "planned:v5e:4x4")), ("seq_len", (128, 256)),
])
def test_a_column_that_differs_splits_the_family(column, values):
    a, b = make_runs(seed=1), make_runs(seed=2)
    a[column], b[column] = values[0], values[1]
    if column == "row_source":
        b["status"] = "planned"
    fits = default_fits(pd.concat([a, b], ignore_index=True))
    one = fits[(fits["family"] == "devices") & (fits["size_name"] == "m") & (fits["strategy"] == "fsdp")
               & (fits["batch_mode"] == "strong") & (fits["y"] == "state_bytes")]
    assert sorted(one[column].tolist(), key=str) == sorted(values, key=str)
    assert (one["n_points"] == 4).all()  # never the 8 points of both sets in one fit


def test_merged_cpu_and_gpu_rows_never_share_a_fit():
    fits = default_fits(pd.concat([make_runs(backend="cpu"), make_runs(seed=5, backend="gpu")], ignore_index=True))
    dev = fits[fits["family"] == "devices"]
    assert (dev["n_points"] <= 4).all()
    assert set(dev["backend"]) == {"cpu", "gpu"}
    gpu = dev[(dev["backend"] == "gpu") & (dev["y"] == "step_time_s")]
    assert (gpu["assessment"] != "not applicable").all()


def test_rows_that_differ_in_a_tied_column_are_refused():
    runs = make_runs()
    other = runs[runs["strategy"] == "tp"].copy()
    other["mesh_shape"] = other["mesh_shape"].str.replace("data:1", "data:9")  # a different mesh, same everything
    with pytest.raises(ValueError, match="'mesh_shape'.*data:"):
        default_fits(pd.concat([runs, other], ignore_index=True))


def test_weak_scaling_keeps_one_family_per_per_device_batch():
    runs = make_runs()
    weak = runs[runs["batch_mode"] == "weak"]
    doubled = weak.assign(global_batch=weak["global_batch"] * 2, tokens_per_s=weak["tokens_per_s"] * 2)
    fits = default_fits(pd.concat([runs, doubled], ignore_index=True))
    rows = fits[(fits["family"] == "devices") & (fits["batch_mode"] == "weak") & (fits["size_name"] == "m")
                & (fits["strategy"] == "dp") & (fits["y"] == "step_time_s")]
    assert sorted(rows["per_device_batch"]) == [4, 8] and (rows["n_points"] == 4).all()


def test_scaling_efficiency_names_each_baseline():
    runs = make_runs()
    runs = runs[runs["status"] == "ok"]
    late = runs[runs["strategy"] == "tp"].assign(strategy="fsdp_tp")
    late = late[late["n_devices"] > 1]  # fsdp_tp's smallest mesh has 2 devices
    late["mesh_shape"] = [f"data:{n // 2},model:2" for n in late["n_devices"]]
    eff = scaling_efficiency(pd.concat([runs, late], ignore_index=True))
    assert (eff.loc[eff["strategy"] == "fsdp_tp", "base_n_devices"] == 2).all()
    assert (eff.loc[eff["strategy"] != "fsdp_tp", "base_n_devices"] == 1).all()
    row = eff[(eff["strategy"] == "fsdp_tp") & (eff["n_devices"] == 8) & (eff["size_name"] == "s")
              & (eff["batch_mode"] == "strong")].iloc[0]
    base = late[(late["n_devices"] == 2) & (late["size_name"] == "s") & (late["batch_mode"] == "strong")]
    top = late[(late["n_devices"] == 8) & (late["size_name"] == "s") & (late["batch_mode"] == "strong")]
    assert row["efficiency"] == pytest.approx((top["tokens_per_s"].iloc[0] / 8) / (base["tokens_per_s"].iloc[0] / 2))


# ------------------------------------------------------------------ knees


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


def test_unusable_values_are_counted_per_column():
    rows = pd.DataFrame({"status": ["ok", "ok", "ok", "error", "ok"], "step_time_s": [0.1, 0.0, np.inf, -1, None],
                         "n_devices": [1, 2, 4, 8, -2]})
    assert families.unusable_values(rows, ["step_time_s", "n_devices", "absent"]) == {"step_time_s": 2,
                                                                                    "n_devices": 1}


def test_why_no_fits_says_what_is_the_case():
    failed = pd.DataFrame({"status": ["oom", "oom", "compile_error"], "n_devices": [1, 2, 4]})
    assert families.why_no_fits(failed) == ("every one of the 3 rows failed (2 oom, 1 compile_error), so there is "
                                            "nothing to fit")
    one = pd.DataFrame({"status": ["ok"], "n_devices": [1]})
    assert families.why_no_fits(one).startswith("1 of the 1 rows succeeded; a fit needs at least 3 points")


def test_pure_power_laws_are_not_flagged_curved():
    x = np.array([1.0, 2, 4, 8, 16, 32, 64])
    assert curvature_test(x, 3 * x ** 0.8).label == ""  # exact: no bend at all
    rng = np.random.default_rng(11)
    flagged = sum(curvature_test(x, 3 * x ** 0.8 * np.exp(rng.normal(0, 0.02, x.size))).label != ""
                  for _ in range(200))
    assert flagged <= 20  # a 5% test with a practical threshold: at most ~5% false alarms (10/200 ± 3 sd)
    assert curvature_test(x, 3 * x ** 0.8 * np.exp(0.05 * np.log(x) ** 2)).label == "convex"


# ------------------------------------------------------------------ predictions


def test_backtest_matches_an_independent_leave_one_out():
    rng = np.random.default_rng(42)
    n = np.array([1.0, 2, 4, 8, 16, 32])
    y = 1000 * n ** 0.85 * np.exp(rng.normal(0, 0.05, n.size))
    out = predict_table(pd.DataFrame({"n_devices": n, "tokens_per_s": y}), "n_devices", "tokens_per_s")
    back = out[(out["kind"] == "backtest") & (out["method"] == "power_law")].iloc[0]
    # Independent: polyfit on the logs without n = 32, and the textbook prediction interval.
    lx, ly = np.log(n[:-1]), np.log(y[:-1])
    slope, intercept = np.polyfit(lx, ly, 1)
    predicted = math.exp(intercept + slope * math.log(32))
    assert back["predicted"] == pytest.approx(predicted, rel=1e-9)
    assert back["measured"] == pytest.approx(y[-1])
    assert back["error"] == pytest.approx(predicted / y[-1] - 1, rel=1e-9, abs=1e-12)
    design = np.column_stack([np.ones(5), lx])
    resid = ly - design @ np.array([intercept, slope])
    s = math.sqrt(resid @ resid / 3)
    x0 = np.array([1.0, math.log(32)])
    half = stats.t.ppf(0.975, 3) * s * math.sqrt(1 + x0 @ np.linalg.inv(design.T @ design) @ x0)
    assert math.log(back["pi_high"]) - math.log(predicted) == pytest.approx(half, rel=1e-9)
    assert back["within_interval"] == (back["pi_low"] <= y[-1] <= back["pi_high"])
    ext = out[(out["kind"] == "extrapolate") & (out["method"] == "power_law")]
    assert list(ext["x_value"]) == [64, 128]
    full_slope, full_intercept = np.polyfit(np.log(n), np.log(y), 1)
    np.testing.assert_allclose(ext["predicted"], np.exp(full_intercept + full_slope * np.log([64, 128])),
                               rtol=1e-9)
    usl = out[out["method"] == "usl"]
    assert set(usl["kind"]) == {"extrapolate", "backtest"}  # 6 counts: enough for the USL and its backtest


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


# ------------------------------------------------------------------ planned rows


def planned_rows(measured: pd.DataFrame) -> pd.DataFrame:
    plan = measured[measured["status"] == "ok"].copy()
    plan["row_source"], plan["status"], plan["backend"] = "planned:v5e:4x4", "planned", "tpu"
    plan["predicted_step_time_s"] = plan["step_time_s"] * 0.8
    plan["step_time_s"], plan["tokens_per_s"] = np.nan, np.nan
    plan["compiled_total_bytes"] = plan["compiled_total_bytes"] * 1.1
    return plan


def test_planned_rows_fit_in_their_own_families():
    measured = make_runs().assign(row_source="measured")
    fits = default_fits(pd.concat([measured, planned_rows(measured)], ignore_index=True))
    plan = fits[fits["row_source"] == "planned:v5e:4x4"]
    assert {"predicted_step_time_s", "state_bytes", "activation_bytes"} <= set(plan["y"])
    assert "step_time_s" not in set(plan["y"]) and "predicted_step_time_s" not in set(
        fits.loc[fits["row_source"] == "measured", "y"])
    pred = plan[(plan["family"] == "devices") & (plan["y"] == "predicted_step_time_s")
                & (plan["batch_mode"] == "strong")]
    assert (pred["ideal_exponent"] == -1).all() and (pred["assessment"] == "worse than ideal").all()
    assert (plan[(plan["family"] == "model_size") & (plan["y"] == "predicted_step_time_s")]["n_points"] == 3).all()


def test_plan_vs_measured_ratios():
    measured = make_runs().assign(row_source="measured", remat="none", xla_flags="")
    measured = measured[measured["batch_mode"] == "strong"]  # one batch mode, as in one profile
    measured["peak_bytes_in_use"] = measured["compiled_total_bytes"] * 0.9
    plan = planned_rows(measured)
    out = plan_vs_measured(pd.concat([measured, plan], ignore_index=True))
    assert len(out) == len(plan)
    np.testing.assert_allclose(out["step_time_ratio"], 0.8)
    np.testing.assert_allclose(out["compiled_ratio"], 1.1)
    np.testing.assert_allclose(out["memory_ratio"], 1.1 / 0.9)
    assert (out["plan_source"] == "planned:v5e:4x4").all()
    assert plan_vs_measured(measured).empty


def test_step_time_against_tokens_where_a_point_ran_several_batches():
    runs = make_runs()
    strong = runs[(runs["batch_mode"] == "strong") & (runs["status"] == "ok")]
    batches = []
    for batch, slowdown in ((16, 1.0), (32, 2.0), (64, 4.1)):  # step time ∝ tokens, 2.5% off at 64
        batches.append(strong.assign(global_batch=batch, tokens_per_step=batch * 128,
                                     step_time_s=strong["step_time_s"] * slowdown))
    fits = default_fits(pd.concat(batches, ignore_index=True))
    tokens = fits[fits["family"] == "tokens"]
    assert len(tokens) == len(strong) and (tokens["n_points"] == 3).all()  # one fit per point of the grid
    assert (tokens["ideal_exponent"] == 1).all()
    np.testing.assert_allclose(tokens["exponent"], math.log(4.1) / math.log(4), rtol=1e-6)
    assert (tokens["assessment"] == "inconclusive").all()  # 3 batches, 1 dof: the bend at 64 is not resolved
    devices = fits[fits["family"] == "devices"]
    assert sorted(set(devices["global_batch"])) == [16, 32, 64]  # and each batch keeps its own device fits


@pytest.mark.parametrize("mode", ["strong", "weak"])
def test_fsdp_tp_memory_ideals(mode):
    # fsdp_tp on meshes (n/2, 2): state sharded over all n devices, the batch over the n/2 data rows.
    rows = []
    for n in (2, 4, 8, 16):
        batch = 32 if mode == "strong" else 4 * n
        state, act = 1.2e8 / n, 5e5 * batch / (n // 2)
        rows.append({"status": "ok", "backend": "gpu", "size_name": "m", "strategy": "fsdp_tp", "n_devices": n,
                     "mesh_shape": f"data:{n // 2},model:2", "global_batch": batch, "batch_mode": mode,
                     "params": 1e7, "param_bytes": state / 3, "opt_state_bytes": 2 * state / 3,
                     "compiled_total_bytes": state + act, "step_time_s": 1.0})
    fits = default_fits(pd.DataFrame(rows)).set_index("y")
    assert fits.loc["state_bytes", "ideal_exponent"] == -1
    assert fits.loc["activation_bytes", "ideal_exponent"] == {"strong": -1, "weak": 0}[mode]
    assert (fits.loc[["state_bytes", "activation_bytes"], "assessment"] == "as ideal").all()
    assert fits.loc["state_bytes", "model_axis"] == 2
