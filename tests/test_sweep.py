"""The sweep loop: the grid for a runtime, and rows recorded as they come."""

import pandas as pd
import pytest

from helpers import TINY_SETS
from jaxscale import sweep
from jaxscale.config import ProfileError, load_profile
from jaxscale.records import KEY_COLUMNS, append_rows, point_key, read_rows


def test_the_grid_follows_the_runtimes_devices_not_this_process():
    class EightOnTwoHosts:
        device_count, process_count = 8, 2

    profile = load_profile("smoke", [*TINY_SETS, "mesh.devices=[1,2,4,8]"])
    here, _ = sweep.grid_for(profile)
    there, dropped = sweep.grid_for(profile, EightOnTwoHosts())
    assert {p.n_devices for p in here} == {1, 2, 4, 8}  # the tests' 8 CPU devices
    # a mesh smaller than the hosts cannot take a device from each of them
    assert {p.n_devices for p in there} == {2, 4, 8} and sum(dropped.values()) > 0


def test_rows_are_appended_as_they_come_and_a_stop_keeps_them(tmp_path):
    seen = []
    stopped = append_rows(["a", "b", "c"], lambda p, i: {"size_name": p, "n_devices": i, "status": "ok"},
                          tmp_path / "runs.csv", on_point=lambda p, i, n: seen.append(("point", p, i, n)),
                          on_row=lambda row: seen.append(("row", row["size_name"])),
                          should_stop=lambda i: i == 1)
    assert stopped  # asked to stop after "b", with "c" still to do
    assert seen == [("point", "a", 0, 3), ("row", "a"), ("point", "b", 1, 3), ("row", "b")]
    rows = read_rows(tmp_path / "runs.csv")
    assert list(rows["size_name"]) == ["a", "b"] and list(rows["n_devices"]) == [0, 1]
    assert not append_rows(["d"], lambda p, i: {"size_name": p}, tmp_path / "runs.csv", should_stop=lambda i: True)


def test_a_point_key_is_the_same_built_here_and_read_back(tmp_path):
    from jaxscale.records import RowWriter

    points, _ = sweep.grid_for(load_profile("smoke", [*TINY_SETS, "mesh.devices=[2]"]))
    built = [{**p.grid_columns(), "dtype": "float32", "attention": "auto", "scan_layers": False} for p in points]
    with RowWriter(tmp_path / "runs.csv") as writer:
        for row in built:
            writer.append(row)
    read = read_rows(tmp_path / "runs.csv").to_dict("records")
    assert [point_key(r) for r in read] == [point_key(r) for r in built]
    assert len({point_key(r) for r in built}) == len(built)  # one key per point
    assert point_key({**built[0], "size_name": "renamed"}) == point_key(built[0])  # a label is not the program
    assert point_key({**built[0], "scan_layers": True}) != point_key(built[0])


def test_checked_grid_refuses_a_trace_that_matches_nothing_and_rows_of_another_grid(tmp_path):
    class OneHost:
        device_count, process_count, lead = 8, 1, True

    profile = load_profile("smoke", [*TINY_SETS, "mesh.devices=[1,2]", "mesh.strategies=dp"])
    points, _ = sweep.checked_grid(profile, OneHost(), trace="n_devices=2")
    assert sorted(p.n_devices for p in points) == [1, 2]
    with pytest.raises(ProfileError, match="n_devices=4"):
        sweep.checked_grid(profile, OneHost(), trace="n_devices=4")
    # A folder without profile.toml whose rows are points of a wider grid: refused on process 0 only.
    wider = load_profile("smoke", [*TINY_SETS, "mesh.devices=[1,2,4]", "mesh.strategies=dp"])
    recorded = pd.DataFrame([dict(zip(KEY_COLUMNS, p.key)) for p in sweep.checked_grid(wider, OneHost())[0]])
    with pytest.raises(ProfileError, match="1 of its 3 rows"):
        sweep.checked_grid(profile, OneHost(), resume=tmp_path, recorded=recorded)

    class OtherHost(OneHost):
        lead = False

    assert len(sweep.checked_grid(profile, OtherHost(), resume=tmp_path, recorded=recorded)[0]) == 2
