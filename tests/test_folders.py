"""Report folders: never shared, one writer, a killed holder does not block, unusable paths are one line."""

import os
import signal
import subprocess
import sys

import pytest

from jaxscale import folders
from jaxscale.folders import ReportDir, ReportDirError, check_output_dir
from jaxscale.records import RowWriter


def test_report_folders_are_never_shared(tmp_path):
    """Two runs started in the same second get two folders (the name has second resolution)."""
    first = ReportDir.create(tmp_path, "smoke-20261128T120000Z")
    second = ReportDir.create(tmp_path, "smoke-20261128T120000Z")
    assert first.path != second.path and second.path.name == "smoke-20261128T120000Z-2"
    assert first.run_id != second.run_id
    assert folders.read_run_id(first.path) == first.run_id and folders.read_run_id(second.path) == second.run_id
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
    code = ("import os, sys; from jaxscale.folders import ReportDir; ReportDir.reopen(sys.argv[1]); "
            "print('held', flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and "held" in proc.stdout
    assert (folder / folders.LOCK_FILE).read_text().startswith("process")  # its note is still there
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


def test_default_outputs_go_beside_a_folder_or_a_csv(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "runs.csv").write_text("")
    assert folders.beside(tmp_path / "report", "analysis") == tmp_path / "report" / "analysis"
    assert folders.beside(tmp_path / "report" / "runs.csv", "compare") == (tmp_path / "report" / "compare").resolve()
