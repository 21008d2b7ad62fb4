"""report.py: the files write_report leaves behind, and what the text says (no jax here)."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from jaxscale import analyze
from jaxscale.report import axis_label, fits_console_table, fits_markdown, plot_families, write_report


def small_runs() -> pd.DataFrame:
    """Strong scaling, two sizes × two strategies × four device counts, step time ∝ params / n^0.9."""
    rng = np.random.default_rng(0)
    rows = []
    for name, d in (("s", 256), ("m", 512)):
        params = 48 * d * d
        for strategy in ("dp", "fsdp"):
            for n in (1, 2, 4, 8):
                step = 1e-9 * params * n ** -0.9 * np.exp(rng.normal(0, 0.02))
                mem = 16.0 * params / (1 if strategy == "dp" else n) * np.exp(rng.normal(0, 0.02))
                rows.append({"status": "ok", "size_name": name, "d_model": d, "n_layers": 4, "n_heads": 4,
                             "d_ff": 4 * d, "seq_len": 128, "vocab": 512, "strategy": strategy, "n_devices": n,
                             "global_batch": 16, "batch_mode": "strong", "dtype": "float32", "params": params,
                             "step_time_s": step, "tokens_per_s": 16 * 128 / step, "compiled_total_bytes": mem,
                             "compiled_argument_bytes": mem / 2, "model_flops_per_step": 6.0 * params * 2048})
    rows.append({**rows[0], "status": "oom", "step_time_s": None, "n_devices": 16})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    runs = small_runs()
    fits = analyze.default_fits(runs)
    checks = analyze.check_expectation(runs, "step_time_s", "n_devices", -1.0)
    out = tmp_path_factory.mktemp("report")
    paths = write_report(out, fits, runs=runs, efficiency=analyze.scaling_efficiency(runs),
                         joint=analyze.default_joint_fit(runs), expectations=checks)
    return out, paths, fits


def test_fits_csv_reads_back(written):
    out, paths, fits = written
    assert paths["fits.csv"] == out / "fits.csv"
    back = pd.read_csv(out / "fits.csv")
    assert len(back) == len(fits)
    np.testing.assert_allclose(back["exponent"], fits["exponent"].astype(float), rtol=1e-12)
    np.testing.assert_allclose(back["ci_high"], fits["ci_high"].astype(float), rtol=1e-12)
    assert list(back["y"]) == list(fits["y"])
    assert (out / "efficiency.csv").exists() and (out / "joint.csv").exists()


def test_summary_has_every_section(written):
    out, _, fits = written
    text = (out / "summary.md").read_text()
    for heading in ("## devices", "## model_size", "## Scaling efficiency", "## Joint fit", "## Expectations",
                    "## Notes"):
        assert heading in text
    for y in ("step_time_s", "tokens_per_s", "memory_per_device_bytes", "model_flops_per_step"):
        assert f"| {y} |" in text
    # The failed n=16 row of (s, dp) is reported as left out.
    assert "s dp: 1 row(s) left out" in text
    fsdp_m = fits[(fits["y"] == "step_time_s") & (fits["strategy"] == "fsdp")
                         & (fits["size_name"] == "m")].iloc[0]
    assert f"{fsdp_m['exponent']:+.3f}" in text


def test_plots_exist_and_are_images(written):
    out, paths, _ = written
    plots = sorted(p for name, p in paths.items() if name.startswith("plots/"))
    names = {p.name for p in plots}
    assert {"devices__step_time_s.png", "devices__tokens_per_s.png", "devices__memory_per_device_bytes.png",
            "model_size__step_time_s.png"} <= names
    for path in plots:
        assert path.exists() and path.stat().st_size > 15_000
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_markdown_for_an_arbitrary_csv_fit():
    x = np.array([1.0, 2, 4, 8])
    df = pd.DataFrame({"g": ["a"] * 4 + ["b"] * 2, "n": [*x, 1, 2], "t": [*(3 / x), 1, 1]})
    fits = analyze.fit_table(df, "n", "t", by=("g",))
    text = fits_markdown(fits)
    assert "## y against n" in text
    assert "b / t: no fit: need at least 3 points" in text
    assert "-1.000 ± 0.000" in text


def test_console_table_lists_every_fit():
    fits = analyze.default_fits(small_runs())
    table = fits_console_table(fits)
    assert table.row_count == len(fits)
    console = Console(record=True, width=220)
    console.print(table)
    rendered = console.export_text()
    assert "superlinear" in rendered and "model_size" in rendered


def test_plots_without_runs(tmp_path):
    fits = analyze.default_fits(small_runs())
    paths = plot_families(None, fits, tmp_path / "plots")
    assert paths and all(p.stat().st_size > 10_000 for p in paths)


def test_axis_labels_carry_units():
    assert axis_label("step_time_s") == "step time (s)"
    assert axis_label("all_gather_bytes") == "all gather (bytes)"
    assert axis_label("compile_s") == "compile (s)"
