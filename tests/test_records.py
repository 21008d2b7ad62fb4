"""Report folders and rows: exclusive folders, one writer, run ids, old files, duplicates, unusable paths."""

import csv
import os
import signal
import subprocess
import sys

import pandas as pd
import pytest

from jaxscale import records
from jaxscale.records import (COLUMNS, ReportDir, ReportDirError, RowWriter, check_output_dir, drop_duplicates,
                              read_rows)

# ------------------------------------------------------------------ folders


def test_report_folders_are_never_shared(tmp_path):
    """Two runs started in the same second get two folders (the name has second resolution)."""
    first = ReportDir.create(tmp_path, "smoke-20261128T120000Z")
    second = ReportDir.create(tmp_path, "smoke-20261128T120000Z")
    assert first.path != second.path and second.path.name == "smoke-20261128T120000Z-2"
    assert first.run_id != second.run_id
    assert records.read_run_id(first.path) == first.run_id and records.read_run_id(second.path) == second.run_id
    first.release()
    second.release()


def test_a_folder_in_use_is_refused_naming_its_holder(tmp_path):
    held = ReportDir.create(tmp_path, "r")
    with pytest.raises(ReportDirError) as caught:
        ReportDir.reopen(held.path)
    message = str(caught.value)
    assert f"process {os.getpid()}" in message and "in use" in message and str(held.path) in message
    assert "\n" not in message
    held.release()
    again = ReportDir.reopen(held.path)  # free once released
    assert again.run_id == held.run_id  # a resume continues the same run
    again.release()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    code = ("import os, sys; from jaxscale.records import ReportDir; ReportDir.reopen(sys.argv[1]); "
            "print('held', flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "held" in proc.stdout
    assert (folder / records.LOCK_FILE).read_text().startswith("process")  # its note is still there
    ReportDir.reopen(folder).release()  # but the kernel dropped the lock with the process


def test_discard_removes_only_an_empty_folder_it_created(tmp_path):
    empty = ReportDir.create(tmp_path, "empty")
    empty.discard()
    assert not empty.path.exists()
    used = ReportDir.create(tmp_path, "used")
    with RowWriter(used.path / "runs.csv") as w:
        w.append({"status": "ok", "strategy": "dp", "n_devices": 1})
    used.discard()
    assert (used.path / "runs.csv").exists()
    resumed = ReportDir.reopen(tmp_path / "used")
    (used.path / "runs.csv").unlink()
    resumed.discard()
    assert used.path.exists()  # a resumed folder is never removed


# ------------------------------------------------------------------ rows


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


def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "below"):
        with pytest.raises(ReportDirError, match=f"{blocker} is a file, not a folder"):
            check_output_dir(target)
    if os.path.isdir("/sys") and _mkdir_fails("/sys"):  # read-only even for root (sysfs)
        with pytest.raises(ReportDirError, match="cannot write in /sys"):
            check_output_dir("/sys/jaxscale-out")

    class Full:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", lambda path: Full())
    with pytest.raises(ReportDirError, match="no space left.*40960 bytes free"):
        check_output_dir(tmp_path / "out")
    with pytest.raises(ReportDirError, match="no space left"):
        ReportDir.create(tmp_path / "out", "r")
    assert not (tmp_path / "out").exists()


def _mkdir_fails(parent: str) -> bool:
    try:
        os.mkdir(os.path.join(parent, "jaxscale-probe-test"))
    except OSError:
        return True
    os.rmdir(os.path.join(parent, "jaxscale-probe-test"))
    return False
