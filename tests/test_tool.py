"""Traces of selected points, and JAX's persistent compilation cache."""

from helpers import TINY_SETS, cli_env, jaxscale, sets
from jaxscale.records import read_rows


def test_trace_captures_only_the_selected_points(tmp_path):
    proc = jaxscale("run", "smoke", "--out", tmp_path, "--no-analyze", "--trace", "strategy=fsdp,n_devices=2",
                    *sets(*TINY_SETS, "mesh.devices=[1,2]", 'mesh.strategies=["dp","fsdp"]'), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (report,) = tmp_path.iterdir()
    rows = read_rows(report / "runs.csv").set_index(["strategy", "n_devices"])
    traced = rows["trace_dir"].dropna()
    assert list(traced.index) == [("fsdp", 2)]
    written = list((report / traced.iloc[0].split(str(report) + "/")[-1]).rglob("*.xplane.pb"))
    assert written and written[0].stat().st_size > 0  # what the profiler wrote, viewable in XProf/Perfetto


def test_second_run_compiles_nothing_new(tmp_path):
    cache = tmp_path / "cache"
    env = cli_env(JAXSCALE_CACHE_DIR=cache)
    args = ["run", "smoke", "--no-analyze", *sets(*TINY_SETS, "mesh.devices=[1,2]", 'mesh.strategies=["dp","fsdp"]')]
    first = jaxscale(*args, "--out", tmp_path / "a", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    entries = sorted(p.name for p in (cache / "xla").iterdir())
    assert len(entries) >= 4  # at least one executable per point
    second = jaxscale(*args, "--out", tmp_path / "b", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in (cache / "xla").iterdir()) == entries
    off = jaxscale(*args, "--no-compile-cache", "--out", tmp_path / "c", cwd=tmp_path,
                   env=cli_env(JAXSCALE_CACHE_DIR=tmp_path / "other"))
    assert off.returncode == 0 and not (tmp_path / "other" / "xla").exists()
