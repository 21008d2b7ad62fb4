"""analyze.py against planted truths: default families, expectations, predictions, plans, analyze_rows (no jax here)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from jaxscale import analyze
from jaxscale.analyze import (check_expectation, default_fits, default_joint_fit, parse_expectation,
                              plan_vs_measured, predict_table, scaling_efficiency)
from jaxscale.families import fit_points, unusable_values
from jaxscale.powerlaw import fit_table, joint_fit
from jaxscale.usl import default_usl, usl_table
from test_powerlaw import planted


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


# ------------------------------------------------------------------ the analysis in one call


def test_analyze_rows_default_pipeline_is_the_default_tables():
    runs = make_runs()
    runs.loc[3, "step_time_s"] = 0.0  # a successful row a log-log fit cannot use
    measured = runs.assign(row_source="measured")
    rows = pd.concat([measured, planned_rows(measured)], ignore_index=True)
    result = analyze.analyze_rows(rows, confidence=0.9, tolerance=0.1)
    pd.testing.assert_frame_equal(result.fits, default_fits(rows, confidence=0.9, tolerance=0.1))
    pd.testing.assert_frame_equal(result.efficiency, scaling_efficiency(rows))
    pd.testing.assert_frame_equal(result.joint, default_joint_fit(rows, confidence=0.9, tolerance=0.1))
    pd.testing.assert_frame_equal(result.usl, default_usl(rows, confidence=0.9))
    pd.testing.assert_frame_equal(result.predictions, analyze.default_predictions(rows, confidence=0.9))
    pd.testing.assert_frame_equal(result.plan, plan_vs_measured(rows))
    assert result.expectations is None
    # The zero step time, and the plan's predicted step time made from it.
    assert result.unusable == unusable_values(rows, analyze.DEFAULT_COLUMNS) == {"step_time_s": 1,
                                                                                 "predicted_step_time_s": 1}
    assert (result.confidence, result.tolerance) == (0.9, 0.1)
    assert analyze.analyze_rows(measured).plan is None  # no plan meets a measurement


def test_analyze_rows_checks_each_expectation():
    runs = make_runs()
    result = analyze.analyze_rows(runs, expectations=["step_time_s:params=1", "tokens_per_s:n_devices=0.8"])
    expected = pd.concat([check_expectation(runs, "step_time_s", "params", 1.0),
                          check_expectation(runs, "tokens_per_s", "n_devices", 0.8)], ignore_index=True)
    pd.testing.assert_frame_equal(result.expectations, expected)
    with pytest.raises(ValueError, match="Y:X=EXPONENT"):
        analyze.analyze_rows(runs, expectations=["step_time_s"])


def test_analyze_rows_custom_pipeline_is_fit_usl_and_predict_tables():
    x, y = planted(0.7, sigma=0.02, n=8, seed=13)
    rows = pd.DataFrame({"g": np.repeat(["a", "b"], 8), "x": np.tile(x, 2), "y": np.tile(y, 2),
                         "cost": np.tile(1 / y, 2), "status": "ok"})
    rows.loc[0, "cost"] = -1.0
    args = dict(by=["g"], ideal=0.5, directions={"cost": "lower"})
    result = analyze.analyze_rows(rows, x="x", ys=["y", "cost"], expectations=["y:x=0.7"], confidence=0.9,
                                  tolerance=0.02, **args)
    pd.testing.assert_frame_equal(result.fits, fit_table(rows, "x", ["y", "cost"], confidence=0.9, tolerance=0.02,
                                                         **args))
    assert result.fits["exponent"].tolist()[:2] == pytest.approx([0.7, -0.7], abs=0.05)
    pd.testing.assert_frame_equal(result.usl, usl_table(rows, "x", ["y", "cost"], by=["g"], confidence=0.9,
                                                        directions={"cost": "lower"}))
    pd.testing.assert_frame_equal(result.predictions, predict_table(rows, "x", ["y", "cost"], by=["g"],
                                                                    confidence=0.9, directions={"cost": "lower"}))
    pd.testing.assert_frame_equal(result.expectations, check_expectation(rows, "y", "x", 0.7, by=["g"],
                                                                         confidence=0.9, tolerance=0.02))
    assert result.efficiency is None and result.joint is None and result.plan is None
    assert result.unusable == {"cost": 1}


@pytest.mark.parametrize("x, ys", [("x", ()), (None, ("y",))])
def test_analyze_rows_needs_x_and_ys_together(x, ys):
    with pytest.raises(ValueError, match="--x and --y go together"):
        analyze.analyze_rows(pd.DataFrame({"x": [1.0, 2, 4], "y": [1.0, 2, 4]}), x=x, ys=ys)
