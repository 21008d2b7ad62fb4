"""`jaxscale run / analyze / devices` end to end, through a subprocess as a user runs them."""

import pandas as pd
import pytest

from helpers import FAST_COMPILE_FLAGS, jaxscale, sets
from jaxscale.records import COLUMNS, read_rows

MAY_BE_EMPTY = {"error", "flops_note", "trace_dir", "peak_bytes_in_use", "bytes_limit",  # CPU keeps no allocator stats
                "xla_flags",  # the default flag set is empty
                # filled by `jaxscale plan` only
                "topology", "device_memory_bytes", "predicted_compute_s", "predicted_memory_s",
                "predicted_step_time_s", "predicted_mfu"}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    """The smoke profile by name, run from a folder outside the source tree, cut to 2 tiny sizes x devices
    1 and 8 x 4 strategies to keep the suite short."""
    out = tmp_path_factory.mktemp("reports")
    proc = jaxscale("run", "smoke", "--out", out, *sets("model.d_model=[32,64]", "model.n_layers=1",
                                                        "model.seq_len=8", "model.vocab=64", "run.steps=3",
                                                        "mesh.devices=[1,8]"), cwd=out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (report,) = out.iterdir()
    return report, proc


def test_run_writes_a_complete_row_per_point(smoke_report):
    report, proc = smoke_report
    rows = read_rows(report / "runs.csv")
    assert list(rows.columns) == list(COLUMNS)
    # 2 sizes x 2 counts x 4 strategies, less tp at 8 (8 heads: kept) and fsdp_tp at 1 (dropped)
    assert len(rows) == 2 * (2 * 4 - 1)
    assert set(rows["strategy"]) == {"dp", "fsdp", "tp", "fsdp_tp"}
    assert set(rows["n_devices"]) == {1, 8}
    assert (rows["status"] == "ok").all()
    for column in set(COLUMNS) - MAY_BE_EMPTY:
        filled = rows[column].astype(str).str.strip().ne("") & rows[column].notna()
        assert filled.all(), f"column {column} empty in some ok row"
    assert (rows["backend"] == "cpu").all() and (rows["peak_source"] == "measured").all()
    assert (rows["attention_flops"] == "causal_half").all()
    # the CLI forced 8 host devices itself: the environment's XLA_FLAGS set no device count
    assert rows["n_devices"].max() == 8
    assert "1 of 8 grid points dropped" not in proc.stdout  # the count covers both sizes
    assert "2 of 16 grid points dropped" in proc.stdout and "model_axis=2" in proc.stdout


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


def test_analyze_reads_the_rows_again(smoke_report, tmp_path, no_plots):
    from jaxscale import cli

    report, _ = smoke_report
    assert cli.main(["analyze", str(report / "runs.csv"), "--out", str(tmp_path / "a"),
                     "--expect", "step_time_s:params=1.5"]) == 0
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


def test_named_profiles_resolve_outside_the_source_tree(smoke_report):
    """smoke_report ran `jaxscale run smoke` by name in a temporary folder, not in the source tree."""
    from pathlib import Path

    report, proc = smoke_report
    source_tree = Path(__file__).resolve().parents[1]
    assert proc.returncode == 0 and source_tree not in report.resolve().parents
    assert (report / "profile.toml").read_text() and report.name.startswith("smoke-")


def test_run_and_plan_list_their_failures_alike():
    """One printer for `run` (every failed row) and `plan` (its compile errors): the count, then a line each
    with the point, its status and the start of its error, brackets and all."""
    import io

    from rich.console import Console

    from jaxscale.console import print_failures

    rows = pd.DataFrame([{"size_name": "1b", "strategy": "fsdp", "n_devices": 16, "status": "compile_error",
                          "error": "XlaRuntimeError: [tpu] " + "x" * 300},
                         {"size_name": "d64-l2", "strategy": "dp", "n_devices": 2, "status": "oom", "error": "OOM"}])
    out = io.StringIO()
    assert print_failures(Console(file=out, width=400), rows) == 2
    lines = out.getvalue().splitlines()
    assert lines[0] == "2 point(s) failed:"
    assert lines[1] == "  1b fsdp n=16: compile_error: " + ("XlaRuntimeError: [tpu] " + "x" * 300)[:200]
    assert lines[2] == "  d64-l2 dp n=2: oom: OOM"
    empty = io.StringIO()
    assert print_failures(Console(file=empty), rows.iloc[:0]) == 0 and empty.getvalue() == ""


def test_tables_off_a_terminal_keep_every_cell_whole():
    import io

    from rich.console import Console
    from rich.table import Table

    from jaxscale.console import print_table

    table = Table(title="fits")
    table.add_column("group", justify="left", max_width=10, overflow="ellipsis")
    table.add_column("exponent", justify="right")
    long = "d256-l2 fsdp_tp model_axis=2 with a long note"
    table.add_row(f"[yellow]{long}[/]", "-0.994 ± 0.006")
    out = io.StringIO()
    print_table(Console(file=out, width=40), table)
    text = out.getvalue()
    assert long in text and "-0.994 ± 0.006" in text and "…" not in text and "[yellow]" not in text


# ------------------------------------------------------------------ what a run records about itself


def test_rows_carry_the_run_id_and_runtime_json_the_users_flags(smoke_report):
    import json

    from jaxscale.folders import read_run_id

    report, proc = smoke_report
    rows = read_rows(report / "runs.csv")
    assert set(rows["run_id"]) == {read_run_id(report)} and rows["run_id"].iloc[0]
    runtime = json.loads((report / "runtime.json").read_text())
    assert runtime["xla_flags"] == FAST_COMPILE_FLAGS  # the environment's (helpers.cli_env), without a device count
    assert runtime["xla_flags_added"] == "--xla_force_host_platform_device_count=8"
    assert {"cuda_version", "cudnn_version", "cuda_driver_version"} <= set(runtime)
    # paths are printed whole off a terminal, however long
    closing = [line for line in proc.stdout.splitlines() if line.startswith("fits: ")]
    assert closing == [f"fits: {report / 'fits.csv'}, summary: {report / 'summary.md'}, plots: {report / 'plots'}"]


def test_profiles_lists_every_shipped_profile_on_one_line(capsys):
    from jaxscale import cli
    from jaxscale.config import shipped_profiles

    assert cli.main(["profiles"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_profiles())
    assert [line.split()[1] for line in lines if line.startswith("tpu-v5e-256-plan")] == ["plan"]
    assert any(line.startswith("smoke ") and "The default profile" in line for line in lines)


# ------------------------------------------------------------------ analyze: what it says about its input


def test_analyze_takes_a_report_folder_and_reads_a_file_given_twice_once(smoke_report, tmp_path, capsys, no_plots):
    from jaxscale import cli

    report, _ = smoke_report
    assert cli.main(["analyze", str(report), str(report / "runs.csv"), "--out", str(tmp_path / "a")]) == 0
    assert f"{report / 'runs.csv'} holds the same rows as {report}; read once" in capsys.readouterr().err
    once = pd.read_csv(report / "fits.csv")  # the run's own analysis of the same rows
    again = pd.read_csv(tmp_path / "a" / "fits.csv")
    assert again["n_points"].tolist() == once["n_points"].tolist()
    assert again["exponent"].to_numpy() == pytest.approx(once["exponent"].to_numpy(), nan_ok=True)


def test_analyze_drops_rows_of_one_run_recorded_twice(smoke_report, tmp_path, capsys, no_plots):
    from jaxscale import cli

    report, _ = smoke_report
    lines = (report / "runs.csv").read_text().splitlines()
    doubled = tmp_path / "doubled.csv"
    doubled.write_text("\n".join(lines + lines[1:]) + "\n")  # what two resumes of one folder used to write
    assert cli.main(["analyze", str(doubled), "--out", str(tmp_path / "d")]) == 0
    assert f"dropped {len(lines) - 1} duplicate row(s)" in capsys.readouterr().err
    assert (pd.read_csv(tmp_path / "d" / "fits.csv")["n_points"].to_numpy()
            == pd.read_csv(report / "fits.csv")["n_points"].to_numpy()).all()


def test_analyze_says_why_there_is_no_fit_and_what_it_left_out(smoke_report, tmp_path, capsys, no_plots):
    from jaxscale import cli

    report, _ = smoke_report
    rows = read_rows(report / "runs.csv")
    one = tmp_path / "one.csv"
    rows.iloc[:1].to_csv(one, index=False)
    assert cli.main(["analyze", str(one), "--out", str(tmp_path / "one")]) == 0
    err = capsys.readouterr().err
    assert "no fits: 1 of the 1 rows succeeded; a fit needs at least 3 points" in err
    assert "1 of the 1 rows succeeded" in (tmp_path / "one" / "summary.md").read_text()
    few = rows[rows["d_model"] == 32].iloc[:4]  # 4 rows: small and quick to fit
    failed = tmp_path / "failed.csv"
    few.assign(status=["oom", "oom", "error", "oom"], step_time_s=None).to_csv(failed, index=False)
    assert cli.main(["analyze", str(failed), "--out", str(tmp_path / "failed")]) == 0
    assert "no fits: every one of the 4 rows failed (3 oom, 1 error)" in capsys.readouterr().err
    assert "every one of the 4 rows failed" in (tmp_path / "failed" / "summary.md").read_text()
    bad = tmp_path / "bad.csv"
    few.assign(step_time_s=[0.0, float("inf"), -1.0, 0.5]).to_csv(bad, index=False)
    assert cli.main(["analyze", str(bad), "--out", str(tmp_path / "bad")]) == 0
    assert "step_time_s: 3 row(s) with a value <= 0 or infinite left out of the fits" in capsys.readouterr().err


def test_analyze_output_path_problems_are_one_line(smoke_report, tmp_path, capsys, no_plots):
    from jaxscale import cli

    report, _ = smoke_report
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert cli.main(["analyze", str(report), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("jaxscale: error: --out") and "is a file, not a folder" in err and "\n" not in err


def test_every_command_the_parser_knows_has_a_function_and_bad_input_is_one_kind():
    import argparse

    from jaxscale import cli
    from jaxscale.comparison import CompareError
    from jaxscale.config import BadInput, ProfileError
    from jaxscale.folders import ReportDirError
    from jaxscale.options import build_parser
    from jaxscale.targets import TargetError

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(cli.COMMANDS)
    assert all(issubclass(e, BadInput) for e in (ProfileError, ReportDirError, TargetError, CompareError))


def test_the_cli_loads_no_jax_before_a_command_sets_up_the_process():
    import subprocess
    import sys

    code = "import sys, jaxscale.cli; print(sorted(m for m in ('jax', 'jaxlib', 'pandas') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
