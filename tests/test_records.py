"""Rows: run ids on every row, old files read and upgraded, duplicates, the point key."""

import csv

import pandas as pd
import pytest

from jaxscale.folders import ReportDir
from jaxscale import families
from jaxscale.records import CONFIG_COLUMNS, COLUMNS, NON_CONFIG_COLUMNS, RowWriter, drop_duplicates, read_rows

def test_rows_carry_the_folder_run_id(tmp_path):
    report = ReportDir.create(tmp_path, "r")
    with RowWriter(report.path / "runs.csv") as w:  # as plan.py opens it: no run id given
        w.append({"status": "ok", "strategy": "dp", "n_devices": 1})
        w.append({"status": "ok", "strategy": "dp", "n_devices": 2, "run_id": "earlier"})
    report.release()
    rows = read_rows(report.path / "runs.csv")
    assert list(rows["run_id"]) == [report.run_id, "earlier"]
    assert int(rows["schema_version"].isna().sum()) == 2  # the writer stamps only the run id


def test_appending_to_a_file_of_an_older_schema_upgrades_its_header(tmp_path):
    """Rows appended on resume line up with the header; the old rows keep every value."""
    old_columns = [c for c in COLUMNS if c != "run_id"]
    path = tmp_path / "runs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(old_columns)
        writer.writerow(["2" if c == "schema_version" else "dp" if c == "strategy" else "1" if c == "n_devices"
                         else "ok" if c == "status" else "" for c in old_columns])
    with RowWriter(path, run_id="R") as w:
        w.append({"schema_version": 3, "status": "ok", "strategy": "fsdp", "n_devices": 2})
    rows = read_rows(path)
    assert list(rows.columns) == list(COLUMNS)
    assert list(rows["strategy"]) == ["dp", "fsdp"] and list(rows["n_devices"]) == [1, 2]
    assert list(rows["schema_version"]) == [2, 3] and list(rows["run_id"]) == ["R", "R"]


def test_old_files_read_as_they_are(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("schema_version,strategy,n_devices,status\n2,dp,1,ok\n")
    rows = read_rows(path)
    assert "run_id" not in rows.columns and list(rows["n_devices"]) == [1]


def _rows(run_ids, devices):
    return pd.DataFrame({"run_id": run_ids, "strategy": "dp", "n_devices": devices, "mesh_shape": "data:1,model:1",
                         "step_time_s": [0.1 * (i + 1) for i in range(len(devices))]})


def test_duplicates_are_the_same_run_and_point():
    rows = _rows(["a", "a", "b", "a"], [1, 1, 1, 2])
    kept, dropped = drop_duplicates(rows)
    assert dropped == 1
    assert list(zip(kept["run_id"], kept["n_devices"])) == [("a", 1), ("b", 1), ("a", 2)]
    assert kept["step_time_s"].iloc[0] == pytest.approx(0.1)  # the first one is kept


def test_rows_without_a_run_id_take_their_file_as_the_run():
    rows = _rows([None, None, None], [1, 1, 2])
    runs = pd.Series(["file 0", "file 1", "file 0"])
    assert drop_duplicates(rows, runs)[1] == 0
    assert drop_duplicates(rows)[1] == 1  # one run when nothing tells them apart
    other = pd.DataFrame({"x": [1, 1], "y": [2, 2]})
    assert drop_duplicates(other)[1] == 0  # any other CSV is left alone


# ------------------------------------------------------------------ paths


def test_every_row_column_is_classified():
    linked = {c for cs in families.X_LINKED.values() for c in cs}
    unclassified = set(COLUMNS) - set(CONFIG_COLUMNS) - NON_CONFIG_COLUMNS - linked
    assert not unclassified, f"say whether these split a fit (records.CONFIG_COLUMNS) or not: {unclassified}"
