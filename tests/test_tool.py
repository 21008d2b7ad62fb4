"""Traces of selected points, and JAX's persistent compilation cache."""

from helpers import TINY_SETS, cli_env, jaxscale, plant_calibration, sets
from jaxscale.records import read_rows


def test_trace_captures_only_the_selected_points(tiny_run):
    """tiny_run traced strategy=fsdp,n_devices=2 of its 4 points."""
    report = tiny_run.report
    rows = read_rows(report / "runs.csv").set_index(["strategy", "n_devices"])
    assert len(rows) == 4
    traced = rows["trace_dir"].dropna()
    assert list(traced.index) == [("fsdp", 2)]
    written = list((report / traced.iloc[0].split(str(report) + "/")[-1]).rglob("*.xplane.pb"))
    assert written and written[0].stat().st_size > 0  # what the profiler wrote, viewable in XProf/Perfetto


def test_second_run_compiles_nothing_new(tiny_run, tmp_path):
    entries = tiny_run.cache_entries  # what tiny_run's cache folder held when it ended
    assert len(entries) >= 4  # at least one executable per point
    second = jaxscale(*tiny_run.args, "--out", tmp_path / "b", cwd=tmp_path, env=tiny_run.env)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (tiny_run.cache / "xla").iterdir()) == entries
    plant_calibration(tmp_path / "other")
    off = jaxscale("run", "smoke", "--no-analyze", *sets(*TINY_SETS, "mesh.devices=[1]", "mesh.strategies=dp"),
                   "--no-compile-cache", "--out", tmp_path / "c", cwd=tmp_path,
                   env=cli_env(JAXSCALE_CACHE_DIR=tmp_path / "other"))
    assert off.returncode == 0, off.stderr
    assert (tmp_path / "c").exists() and not (tmp_path / "other" / "xla").exists()
