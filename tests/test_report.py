"""report.py: the files write_report leaves behind, and what the text says (no jax here)."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from jaxscale import analyze
from jaxscale.powerlaw import fit_table
from jaxscale.report import fits_markdown, write_report
from jaxscale.usl import default_usl


def small_runs(backend: str = "gpu") -> pd.DataFrame:
    """Strong scaling, two sizes × two strategies × four device counts, step time ∝ params / n^0.9."""
    rng = np.random.default_rng(0)
    rows = []
    for name, d in (("s", 256), ("m", 512)):
        params = 48 * d * d
        for strategy in ("dp", "fsdp"):
            for n in (1, 2, 4, 8):
                step = 1e-9 * params * n ** -0.9 * np.exp(rng.normal(0, 0.005))
                state = 16.0 * params / (1 if strategy == "dp" else n)
                act = 4e4 * d / n * np.exp(rng.normal(0, 0.02))
                rows.append({"status": "ok", "backend": backend, "size_name": name, "d_model": d, "n_layers": 4,
                             "n_heads": 4, "d_ff": 4 * d, "seq_len": 128, "vocab": 512, "strategy": strategy,
                             "n_devices": n, "global_batch": 16, "batch_mode": "strong", "dtype": "float32",
                             "params": params, "step_time_s": step, "tokens_per_s": 16 * 128 / step,
                             "param_bytes": state / 4, "opt_state_bytes": 3 * state / 4,
                             "compiled_total_bytes": state + act, "compiled_argument_bytes": state,
                             "model_flops_per_step": 6.0 * params * 2048})
    rows.append({**rows[0], "status": "oom", "step_time_s": None, "n_devices": 16})
    return pd.DataFrame(rows)


def tables(runs) -> dict:
    return {"fits": analyze.default_fits(runs), "efficiency": analyze.scaling_efficiency(runs),
            "joint": analyze.default_joint_fit(runs),
            "expectations": analyze.check_expectation(runs, "step_time_s", "n_devices", -1.0),
            "usl": default_usl(runs), "predictions": analyze.default_predictions(runs)}


def write_all(out, runs):
    t = tables(runs)
    return write_report(out, t["fits"], runs=runs,
                        **{k: v for k, v in t.items() if k != "fits"}), t["fits"]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths, fits = write_all(out, small_runs())
    return out, paths, fits


def test_fits_csv_reads_back(written):
    out, paths, fits = written
    assert paths["fits.csv"] == out / "fits.csv"
    back = pd.read_csv(out / "fits.csv", keep_default_na=False, na_values=[""])
    assert len(back) == len(fits)
    np.testing.assert_allclose(back["exponent"], fits["exponent"].astype(float), rtol=1e-12)
    np.testing.assert_allclose(back["ci_high"], fits["ci_high"].astype(float), rtol=1e-12)
    assert list(back["y"]) == list(fits["y"])
    assert list(back["assessment"].fillna("")) == list(fits["assessment"])
    assert {"assessment", "regime", "direction", "tolerance", "curvature", "note"} <= set(back.columns)
    assert (out / "efficiency.csv").exists() and (out / "joint.csv").exists()


def test_usl_and_prediction_tables(written):
    out, paths, _ = written
    usl = pd.read_csv(out / "usl.csv")
    assert {"sigma", "sigma_ci_low", "sigma_ci_high", "kappa", "kappa_ci_low", "kappa_ci_high", "peak_n",
            "n_points", "note", "size_name", "strategy"} <= set(usl.columns)
    assert len(usl) == 4  # one per size and strategy: every throughput family with 4 device counts
    predictions = pd.read_csv(out / "predictions.csv")
    assert {"y", "x", "x_value", "predicted", "pi_low", "pi_high", "measured", "error", "size_name"} <= set(
        predictions.columns)
    back = predictions[predictions["kind"] == "backtest"]
    assert back["measured"].notna().all() and back["error"].notna().all()
    assert set(predictions.loc[predictions["kind"] == "extrapolate", "x_value"]) == {16, 32}


def test_summary_has_every_section(written):
    out, _, fits = written
    text = (out / "summary.md").read_text()
    for heading in ("## Verdicts at a glance", "## devices", "## model_size", "## Scaling efficiency",
                    "## Knees", "## Predictions", "## Joint fit", "## Expectations", "## Notes"):
        assert heading in text
    for y in ("step_time_s", "tokens_per_s", "state_bytes", "activation_bytes", "model_flops_per_step"):
        assert f"### {y} (" in text
    # The failed n=16 row of (s, dp) is reported as left out.
    assert "s dp: 1 row(s) left out" in text
    fsdp_m = fits[(fits["y"] == "step_time_s") & (fits["strategy"] == "fsdp")
                  & (fits["size_name"] == "m")].iloc[0]
    assert f"{fsdp_m['exponent']:+.3f}" in text


def test_summary_states_the_convention_first(written):
    out, _, _ = written
    top = (out / "summary.md").read_text().split("## ")[0]
    assert "**superlinear** = better than ideal" in top and "± 0.05" in top
    assert "inconclusive" in top and "Curvature" in top


def _efficiency_verdicts(text: str) -> list[tuple[str, float, str]]:
    """(group, efficiency, verdict) at each group's largest device count, read from summary.md."""
    section = text.split("## Scaling efficiency")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| ---")][1:]
    last = {}
    for cells in rows:
        cells = [c.strip() for c in cells]
        last[cells[0]] = (cells[0], float(cells[5]), cells[7])
    return list(last.values())


@pytest.mark.parametrize("b", [0.6, 1.0, 1.2])
def test_summary_verdicts_never_contradict_efficiency(tmp_path, b):
    runs = small_runs()
    runs["tokens_per_s"] = 1e4 * runs["n_devices"] ** b * np.exp(np.random.default_rng(1).normal(0, 0.003, len(runs)))
    runs["step_time_s"] = 16 * 128 / runs["tokens_per_s"]
    text = fits_markdown(**tables(runs))
    verdicts = _efficiency_verdicts(text)
    assert verdicts
    for group, efficiency, verdict in verdicts:
        # efficiency at n = 8 against n = 1 is 8^(b − 1): below 1 exactly when throughput scales worse than ideal.
        assert {"worse than ideal": efficiency < 1, "better than ideal": efficiency > 1,
                "as ideal": abs(math.log(efficiency)) <= 0.05 * math.log(8) + 0.02}[verdict], (group, verdict)
    fits = analyze.default_fits(runs)
    dev = fits[fits["family"] == "devices"]
    by_group = dev.pivot_table(index=["size_name", "strategy"], columns="y", values="assessment", aggfunc="first")
    assert (by_group["step_time_s"] == by_group["tokens_per_s"]).all()  # the same points, the same verdict


def test_cpu_rows_say_why_speed_is_not_graded():
    text = fits_markdown(**tables(small_runs(backend="cpu")))
    assert "Not graded here" in text.split("## Verdicts at a glance")[0]
    speed = text.split("### step_time_s")[1].split("### state_bytes")[0]
    assert "not applicable" in speed and "worse than ideal" not in speed and "better than ideal" not in speed
    assert "Efficiency below 1 is expected here" in text


def test_plots_exist_and_are_images(written):
    out, paths, _ = written
    plots = sorted(p for name, p in paths.items() if name.startswith("plots/"))
    names = {p.name for p in plots}
    assert {"devices__step_time_s.png", "devices__tokens_per_s.png", "devices__state_bytes.png",
            "devices__activation_bytes.png", "model_size__step_time_s.png"} <= names
    for path in plots:
        assert path.exists() and path.stat().st_size > 15_000
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_markdown_for_an_arbitrary_csv_fit():
    x = np.array([1.0, 2, 4, 8])
    df = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 2, "n": [*x, 1, 2], "t": [*(3 / x), 1, 1]})
    fits = fit_table(df, "n", "t", by=("g",), ideal=-1.0)
    text = fits_markdown(fits)
    assert "## y against n" in text
    assert "| g=b |" in text and "too few points: need at least 3 points" in text
    assert "| g=a | -1.000 ± 0.000 | [-1.000, -1.000] | -1 | as ideal | linear |" in text
