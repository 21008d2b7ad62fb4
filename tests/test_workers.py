"""Worker processes: a point's own memory peak, XLA flags per point, a crash costs one row."""

import json
import signal


import jaxscale_faults
from helpers import TINY_SETS, cli_env, jaxscale, sets
from jaxscale import sweep
from jaxscale.config import load_profile
from jaxscale.grid import build_grid
from jaxscale.records import read_rows, row_key

ONE_DEVICE = [*TINY_SETS, "mesh.devices=[1]", "mesh.strategies=dp"]


def test_flags_with_in_process_isolation_are_refused_with_one_line(tmp_path):
    proc = jaxscale("run", "smoke", "--out", tmp_path / "out",
                    *sets(*ONE_DEVICE, 'run.xla_flags=["--xla_cpu_enable_fast_math=false"]', "run.isolation=none"),
                    cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("jaxscale: error:") and "isolation" in line and "--set run.isolation=process" in line
    assert not (tmp_path / "out").exists()


def test_each_point_has_its_own_peak_and_flag_sets_are_families(tmp_path, monkeypatch):
    """Sizes large → small under a fake allocator whose peak, like a real one's, never goes down
    within a process: with a worker per point every row reports its own peak. Two flag sets
    give two families of rows and of fits."""
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"bytes_limit": 1 << 40}))
    monkeypatch.setenv(jaxscale_faults.MEMORY, str(stats))  # hooks/jaxscale_faults.py
    jaxscale_faults.reset_peak()

    in_process = sweep.run_profile(load_profile("smoke", [*ONE_DEVICE, "model.d_model=[64,32]",
                                                          "run.isolation=none"]), tmp_path / "none").rows
    assert list(in_process["isolation"]) == ["none"] * 2
    largest = in_process["compiled_total_bytes"].iloc[0]
    assert (in_process["compiled_total_bytes"].iloc[1:] < largest).all()
    assert (in_process["peak_bytes_in_use"] == largest).all()  # the bug isolation removes

    flags = "--xla_cpu_enable_fast_math=false"
    profile = load_profile("smoke", [*ONE_DEVICE, "model.d_model=[64,32]", f'run.xla_flags=["", "{flags}"]'])
    rows = sweep.run_profile(profile, tmp_path / "process").rows
    assert len(rows) == 4 and (rows["status"] == "ok").all() and (rows["isolation"] == "process").all()
    assert (rows["peak_bytes_in_use"] == rows["compiled_total_bytes"]).all()
    assert sorted(rows["xla_flags"].fillna("").value_counts().to_dict().items()) == [("", 2), (flags, 2)]

    from jaxscale import analyze

    fits = analyze.default_fits(rows)
    step = fits[(fits["y"] == "step_time_s") & (fits["x"] == "params")]
    assert sorted(step["xla_flags"].fillna("")) == ["", flags]


def test_a_point_s_flags_reach_its_worker_s_xla(tmp_path):
    """XLA refuses an unknown flag when its backend starts: the worker dies and the row says why."""
    profile = load_profile("smoke", [*ONE_DEVICE, 'run.xla_flags=["--xla_jaxscale_no_such_flag=1"]'])
    (row,) = sweep.run_profile(profile, tmp_path / "r").rows.to_dict("records")
    assert row["status"] == "crashed" and row["xla_flags"] == "--xla_jaxscale_no_such_flag=1"
    assert "Unknown flag in XLA_FLAGS: --xla_jaxscale_no_such_flag=1" in row["error"]
    assert "worker killed by SIGABRT" in row["error"] or "worker exited with code" in row["error"]


def test_a_killed_worker_is_a_crashed_row_and_resume_completes_the_grid(tmp_path):
    grid = [*TINY_SETS, "mesh.devices=[1,2]", "mesh.strategies=dp", "run.isolation=process"]
    env = cli_env(JAXSCALE_TEST_CRASH="n_devices=1")  # the worker SIGKILLs itself mid-step
    first = jaxscale("run", "smoke", "--out", tmp_path, "--no-analyze", *sets(*grid), cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stderr
    (report,) = tmp_path.iterdir()
    rows = read_rows(report / "runs.csv").set_index("n_devices")
    assert list(rows["status"]) == ["crashed", "ok"]  # the sweep went on after the crash
    error = rows.loc[1, "error"]
    assert f"killed by SIGKILL (signal {signal.SIGKILL.value})" in error and "injected crash" in error
    assert rows.loc[1, "params"] > 0 and rows.loc[1, "isolation"] == "process"
    resumed = jaxscale("run", "--resume", report, "--retry-failed", "--no-analyze", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = read_rows(report / "runs.csv")
    points, _ = build_grid(load_profile("smoke", grid), 8)
    assert sorted(row_key(r) for _, r in after.iterrows()) == sorted(p.key for p in points)
    assert (after["status"] == "ok").all()


def test_accelerator_check_runs_end_to_end_on_the_cpu(tmp_path):
    """The accelerator check's whole pipeline at tiny sizes: grid, memory table, an oversized
    point that comes back as a row, and the plain-JAX step timed against jaxscale's."""
    import csv
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accelerator_check.py"
    spec = importlib.util.spec_from_file_location("accelerator_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    out = tmp_path / "check"
    assert check.main(["--cpu-smoke", "--out", str(out), "--rounds", "2", "--steps", "2"]) == 0
    assert (read_rows(out / "sweep" / "runs.csv")["status"] == "ok").all()
    (big,) = read_rows(out / "oversized" / "runs.csv").to_dict("records")
    assert big["status"] == "over_budget" and big["compiled_total_bytes"] > 12 * big["params"]
    with open(out / "step_comparison.csv") as f:
        rounds = list(csv.DictReader(f))
    assert len(rounds) == 4 and all(float(r["jaxscale_step_s"]) > 0 and float(r["plain_step_s"]) > 0 for r in rounds)
    assert sorted(r["layer_form"] for r in rounds) == ["scan", "scan", "unrolled", "unrolled"]
    assert {r["attention_impl"] for r in rounds} == {"xla"}  # the only attention on a CPU, for both steps
    assert {r["d_model"] for r in rounds} == {str(max(s["d_model"] for s in check.SMOKE_SIZES))}
    assert "ratio" in (out / "summary.md").read_text()
    assert (out / "command.txt").read_text().split()[2:] == ["--cpu-smoke", "--out", str(out), "--rounds", "2",
                                                              "--steps", "2"]
