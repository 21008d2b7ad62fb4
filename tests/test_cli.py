"""`jaxscale run / analyze / devices` end to end, through a subprocess as a user runs them."""

import pandas as pd
import pytest

from helpers import TINY_SETS, jaxscale, sets
from jaxscale.records import COLUMNS, read_rows

MAY_BE_EMPTY = {"error", "flops_note", "trace_dir", "peak_bytes_in_use", "bytes_limit",  # CPU keeps no allocator stats
                "xla_flags",  # the default flag set is empty
                # filled by `jaxscale plan` only
                "topology", "device_memory_bytes", "predicted_compute_s", "predicted_memory_s",
                "predicted_step_time_s", "predicted_mfu"}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    """The smoke profile, cut to 2 sizes x devices 1, 2, 4, 8 x 4 strategies to keep the suite short."""
    out = tmp_path_factory.mktemp("reports")
    proc = jaxscale("run", "smoke", "--out", out, *sets("model.d_model=[32,64]", "model.n_layers=1",
                                                        "run.steps=3"), cwd=out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (report,) = out.iterdir()
    return report, proc


def test_run_writes_a_complete_row_per_point(smoke_report):
    report, proc = smoke_report
    rows = read_rows(report / "runs.csv")
    assert list(rows.columns) == list(COLUMNS)
    # 2 sizes x 4 counts x 4 strategies, less tp at 8 (8 heads: kept) and fsdp_tp at 1 (dropped)
    assert len(rows) == 2 * (4 * 4 - 1)
    assert set(rows["strategy"]) == {"dp", "fsdp", "tp", "fsdp_tp"}
    assert set(rows["n_devices"]) == {1, 2, 4, 8}
    assert (rows["status"] == "ok").all()
    for column in set(COLUMNS) - MAY_BE_EMPTY:
        filled = rows[column].astype(str).str.strip().ne("") & rows[column].notna()
        assert filled.all(), f"column {column} empty in some ok row"
    assert (rows["backend"] == "cpu").all() and (rows["peak_source"] == "measured").all()
    assert (rows["attention_flops"] == "causal_half").all()
    # the CLI forced 8 host devices itself: the environment had no XLA_FLAGS
    assert rows["n_devices"].max() == 8
    assert "1 of 16 grid points dropped" not in proc.stdout  # the count covers both sizes
    assert "2 of 32 grid points dropped" in proc.stdout and "model_axis=2" in proc.stdout


def test_row_figures_follow_their_definitions(smoke_report):
    report, _ = smoke_report
    r = read_rows(report / "runs.csv")
    assert (r["tokens_per_step"] == r["global_batch"] * r["seq_len"]).all()
    assert r["tokens_per_s"].to_numpy() == pytest.approx((r["tokens_per_step"] / r["step_time_s"]).to_numpy())
    mfu = r["model_flops_per_step"] / (r["step_time_s"] * r["n_devices"] * r["peak_tflops_per_device"] * 1e12)
    assert r["mfu"].to_numpy() == pytest.approx(mfu.to_numpy())
    assert (r["step_time_p10_s"] <= r["step_time_s"]).all() and (r["step_time_s"] <= r["step_time_p90_s"]).all()
    total = (r["compiled_argument_bytes"] + r["compiled_output_bytes"] + r["compiled_temp_bytes"]
             - r["compiled_alias_bytes"])
    assert (r["compiled_total_bytes"] == total).all()
    # Donated params and optimizer state alias their outputs.
    assert (r["compiled_alias_bytes"] >= r["param_bytes"] + r["opt_state_bytes"]).all()
    samples = r["step_time_samples_s"].astype(str).str.split(";")
    assert (samples.map(len) == r["n_timed_steps"]).all()


def test_run_saves_profile_and_analysis(smoke_report):
    report, proc = smoke_report
    from jaxscale.config import load_profile

    saved = load_profile(str(report / "profile.toml"))
    assert sorted(m.d_model for m in saved.models) == [32, 64] and saved.run.steps == 3
    fits = pd.read_csv(report / "fits.csv")
    assert {"devices", "model_size"} <= set(fits["family"])
    assert (report / "summary.md").read_text().startswith("# Scaling fits")
    assert list((report / "plots").glob("*.png"))
    assert "jaxscale runs" in proc.stdout


def test_analyze_reads_the_rows_again(smoke_report, tmp_path):
    report, _ = smoke_report
    proc = jaxscale("analyze", report / "runs.csv", "--out", tmp_path / "a", "--expect", "step_time_s:params=1.5",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    again = pd.read_csv(tmp_path / "a" / "fits.csv")
    first = pd.read_csv(report / "fits.csv")
    assert again["exponent"].to_numpy() == pytest.approx(first["exponent"].to_numpy(), nan_ok=True)
    assert (tmp_path / "a" / "expectations.csv").exists()


def test_analyze_any_csv_with_x_y_by(tmp_path):
    # Planted: y = 3·x^-0.5 for group a, 2·x^1.5 for group b.
    xs = [1, 2, 4, 8, 16]
    frame = pd.DataFrame({"chips": xs * 2, "group": ["a"] * 5 + ["b"] * 5,
                          "time": [3 * x ** -0.5 for x in xs] + [2 * x ** 1.5 for x in xs]})
    frame.to_csv(tmp_path / "table.csv", index=False)
    proc = jaxscale("analyze", tmp_path / "table.csv", "--x", "chips", "--y", "time", "--by", "group",
                    "--ideal", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fits = pd.read_csv(tmp_path / "analysis" / "fits.csv").set_index("group")
    assert fits.loc["a", "exponent"] == pytest.approx(-0.5) and fits.loc["a", "regime"] == "sublinear"
    assert fits.loc["b", "exponent"] == pytest.approx(1.5) and fits.loc["b", "regime"] == "superlinear"


def test_devices_names_the_peak_and_its_source(tmp_path):
    proc = jaxscale("devices", "--dtype", "float32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "global_devices: 8" in proc.stdout and "backend: cpu" in proc.stdout
    assert "measured" in proc.stdout and "jaxscale calibrate" in proc.stdout


def test_named_profiles_resolve_outside_the_source_tree(tmp_path):
    proc = jaxscale("run", "smoke", "--out", tmp_path, "--no-analyze",
                    *sets(*TINY_SETS, "mesh.devices=[1]", "mesh.strategies=dp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_tables_off_a_terminal_keep_every_cell_whole():
    import io

    from rich.console import Console
    from rich.table import Table

    from jaxscale.cli import print_table

    table = Table(title="fits")
    table.add_column("group", justify="left", max_width=10, overflow="ellipsis")
    table.add_column("exponent", justify="right")
    long = "d256-l2 fsdp_tp model_axis=2 with a long note"
    table.add_row(f"[yellow]{long}[/]", "-0.994 ± 0.006")
    out = io.StringIO()
    print_table(Console(file=out, width=40), table)
    text = out.getvalue()
    assert long in text and "-0.994 ± 0.006" in text and "…" not in text and "[yellow]" not in text
