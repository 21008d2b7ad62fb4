"""Bad input is refused before anything compiles; failures are rows; sweeps resume after a kill."""

import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest

from helpers import TINY_SETS, cli_env, jaxscale, sets
from jaxscale.records import RowWriter, read_rows, row_key

# ------------------------------------------------------------------ bad input
# Profiles and --set values are checked where they are read (tests/test_config.py calls the loader itself);
# here the command line's own path: one line on stderr, exit code 2, nothing written.


def _assert_refused(proc, tmp_path, fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxscale: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "out").exists()


def test_bad_profile_is_refused_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nd_modle = 32\n")
    proc = jaxscale("run", path, "--out", tmp_path / "out", cwd=tmp_path)
    _assert_refused(proc, tmp_path, [str(path), "[model] d_modle", "did you mean 'd_model'"])


@pytest.mark.parametrize("args, fragments", [
    (["smoke", "--trace", "strategy"], ["selector", "column=value"]),
    (["--resume", "nowhere"], ["no profile.toml"]),
    (["smoke", "--retry-failed"], ["--retry-failed", "--resume REPORT_DIR"]),
])
def test_bad_command_line_is_refused(args, fragments, tmp_path):
    """Before any backend starts: JAX_PLATFORMS=none would make starting one fail."""
    proc = jaxscale("run", *args, "--out", tmp_path / "out", cwd=tmp_path, env=cli_env(JAX_PLATFORMS="none"))
    _assert_refused(proc, tmp_path, fragments)


def test_analyze_bad_input(tmp_path, capsys):
    from jaxscale import cli

    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "t.csv").write_text("chips,time,label\n1,2.0,a\n2,abc,b\n4,1.0,c\n")
    cases = [
        (["missing.csv"], ["missing.csv", "no such file"]),
        (["empty.csv"], ["empty.csv", "empty"]),
        (["t.csv", "--x", "chip", "--y", "time"], ["no column 'chip'", "chips, time, label"]),
        (["t.csv", "--x", "chips", "--y", "time"], ["'time' needs numbers", "'abc'", "row 3"]),
        (["t.csv", "--x", "chips", "--y", "label"], ["'label' needs numbers"]),
        (["t.csv", "--x", "chips", "--y", "chips", "--by", "lab"], ["no --by column 'lab'"]),
        (["t.csv"], ["not jaxscale rows", "--x COL --y COL"]),
        (["t.csv", "--x", "chips", "--y", "time", "--expect", "time:chips"], ["Y:X=EXPONENT"]),
        ([str(tmp_path)], ["a folder without runs.csv"]),
    ]
    for args, fragments in cases:
        args = [a if a.startswith(("-", "/")) or a in ("chip", "chips", "time", "label", "lab", "time:chips")
                else str(tmp_path / a) for a in args]
        assert cli.main(["analyze", *args, "--out", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("jaxscale: error:"), err
        for fragment in fragments:
            assert fragment in err, (fragment, err)
        assert not (tmp_path / "out").exists()


# ------------------------------------------------------- failures become rows


def test_failures_are_rows_and_the_sweep_goes_on(tmp_path):
    """A point whose step raises (a fault injected into the running step) and
    points whose compiled size is over a memory budget are recorded as rows; the
    other points still run; exit code 1 lists them."""
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = 8_000_000  # bytes per device: the d_model=32 points fit, the d_model=256 ones do not
    fraction = budget * 8 / host
    env = cli_env(JAXSCALE_TEST_FAULT="strategy=fsdp,n_devices=2")
    proc = jaxscale("run", "smoke", "--out", tmp_path, "--no-analyze",
                    *sets(*TINY_SETS, "model.d_model=[32,256]", "model.vocab=2048", "mesh.devices=[1,2]",
                          "mesh.strategies=[\"dp\",\"fsdp\"]", f"run.max_memory_fraction={fraction}"),
                    cwd=tmp_path, env=env)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    (report,) = tmp_path.iterdir()
    rows = read_rows(report / "runs.csv").set_index(["d_model", "strategy", "n_devices"])
    assert len(rows) == 8
    assert rows.loc[(32, "fsdp", 2), "status"] == "error"
    assert "injected fault" in rows.loc[(32, "fsdp", 2), "error"]
    small_ok = [k for k in rows.index if k[0] == 32 and k != (32, "fsdp", 2)]
    assert all(rows.loc[k, "status"] == "ok" for k in small_ok)
    big = rows.loc[256]
    assert (big["status"] == "over_budget").all()
    assert (big["compiled_total_bytes"] > budget).all()  # from the compiled step, which was never run
    assert big["step_time_s"].isna().all()
    assert "point(s) failed" in proc.stdout and "over_budget" in proc.stdout


def test_compile_error_is_a_row(tmp_path):
    """cuDNN attention cannot be built for the CPU: a real compile failure."""
    proc = jaxscale("run", "smoke", "--out", tmp_path, "--no-analyze",
                    *sets(*TINY_SETS, "mesh.devices=[1]", "mesh.strategies=dp", "run.attention=cudnn"), cwd=tmp_path)
    assert proc.returncode == 1
    (report,) = tmp_path.iterdir()
    rows = read_rows(report / "runs.csv")
    assert list(rows["status"]) == ["compile_error"] and rows["error"][0]


# ---------------------------------------------------------- nothing is lost


def test_torn_last_line_is_dropped_and_appending_repairs_it(tmp_path):
    path = tmp_path / "runs.csv"
    with RowWriter(path) as w:
        w.append({"status": "ok", "strategy": "dp", "n_devices": 1})
        w.append({"status": "ok", "strategy": "dp", "n_devices": 2})
    with open(path, "a") as f:
        f.write("1,2026-11-23T00:00:00Z,smoke,ok,,d32,fs")  # a kill in the middle of a write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = read_rows(path)
    assert list(rows["n_devices"]) == [1, 2] and "torn" in str(caught[0].message)
    with RowWriter(path) as w:
        w.append({"status": "ok", "strategy": "dp", "n_devices": 4})
    assert list(read_rows(path)["n_devices"]) == [1, 2, 4]


KILL_SETS = [*TINY_SETS, "model.d_model=[32,64]", "mesh.devices=[1,2]", "mesh.strategies=dp"]


def _expected_keys():
    from jaxscale.config import load_profile
    from jaxscale.grid import build_grid

    points, _ = build_grid(load_profile("smoke", KILL_SETS), 8)
    return sorted(p.key for p in points)


@pytest.fixture
def launch():
    """Popen for a test; a process still running when the test ends (one that failed) is killed."""
    procs = []

    def start(cmd, **kwargs):
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs))
        return procs[-1]

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _start(launch, tmp_path, pause_after: int | None = None, hold_s: float = 3):
    """`jaxscale run` of KILL_SETS' 4 points. With ``pause_after`` N, each point after the N-th holds its row for
    hold_s (hooks/jaxscale_faults.py): a test that signals on seeing N rows finds the sweep inside a point however
    late the signal comes, and the point it interrupts takes seconds, not the rest of the grid."""
    cmd = [sys.executable, "-m", "jaxscale.cli", "run", "smoke", "--out", str(tmp_path), "--no-analyze",
           *sets(*KILL_SETS)]
    return launch(cmd, cwd=tmp_path, env=cli_env(**({"JAXSCALE_TEST_PAUSE": f"{pause_after}:{hold_s}"}
                                                     if pause_after else {})))


def _wait_for_rows(tmp_path, n, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(tmp_path.glob("*/runs.csv"))
        if found and len(found[0].read_text().splitlines()) - 1 >= n:
            return found[0].parent
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("sweep produced too few rows")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_sweep_resumes_to_the_full_grid(sig, tmp_path, launch):
    proc = _start(launch, tmp_path, pause_after=2)
    report = _wait_for_rows(tmp_path, 2, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    before = read_rows(report / "runs.csv")
    assert 2 <= len(before) < len(_expected_keys()) == 4
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert f"jaxscale run --resume {report}" in out
    resumed = jaxscale("run", "--resume", report, "--no-analyze", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    after = read_rows(report / "runs.csv")
    keys = sorted(row_key(r) for _, r in after.iterrows())
    assert keys == _expected_keys()  # every point once: none lost, none duplicated
    assert f"{len(before)} points were already recorded" in resumed.stdout
    # rows that were finished before the kill are kept as they were
    assert after["timestamp_utc"].iloc[:len(before)].tolist() == before["timestamp_utc"].tolist()


def test_resume_retry_failed_reruns_only_failures(tmp_path):
    env = cli_env(JAXSCALE_TEST_FAULT="strategy=dp,n_devices=2")
    first = jaxscale("run", "smoke", "--out", tmp_path, "--no-analyze",
                     *sets(*TINY_SETS, "mesh.devices=[1,2]", "mesh.strategies=dp"), cwd=tmp_path, env=env)
    assert first.returncode == 1
    (report,) = tmp_path.iterdir()
    plain = jaxscale("run", "--resume", report, "--no-analyze", cwd=tmp_path)
    assert plain.returncode == 1 and len(read_rows(report / "runs.csv")) == 2  # failures are recorded points
    retry = jaxscale("run", "--resume", report, "--retry-failed", "--no-analyze", cwd=tmp_path)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    rows = read_rows(report / "runs.csv")
    assert sorted(rows["n_devices"]) == [1, 2] and (rows["status"] == "ok").all()


def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(tmp_path, launch):
    """The second point holds its row for 60 s: a first Ctrl-C alone would let it finish and record it, so only
    the second, sent once the first has been acknowledged, can leave the folder with one row. Both are sent while
    the point holds (after the hook says so), where Python runs the handler at once."""
    import threading

    proc = _start(launch, tmp_path, pause_after=1, hold_s=60)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def wait_for(text):
        deadline = time.time() + 120
        while not any(text in line for line in lines):
            assert time.time() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.05)

    wait_for("JAXSCALE_TEST_PAUSE: holding row 2")
    report = _wait_for_rows(tmp_path, 1, proc)
    proc.send_signal(signal.SIGINT)
    wait_for("stopping after the current point")
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert f"jaxscale run --resume {report}" in out.splitlines()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn or malformed line
        assert len(read_rows(report / "runs.csv")) == 1


def test_ctrl_c_before_any_point_leaves_nothing_behind(tmp_path, launch):
    proc = _start(launch, tmp_path)
    deadline = time.time() + 60
    while not list(tmp_path.iterdir()) and time.time() < deadline:  # the folder is claimed before JAX starts
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "Traceback" not in err and "nothing was recorded" in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ one folder, one run


def _popen(*args, cwd, env=None):
    return subprocess.Popen([sys.executable, "-m", "jaxscale.cli", *map(str, args)], cwd=cwd, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_exact(folder):
    """Every point of the folder's profile once, all of its own run."""
    from jaxscale.config import load_profile
    from jaxscale.grid import build_grid
    from jaxscale.folders import read_run_id

    rows = read_rows(folder / "runs.csv")
    points, _ = build_grid(load_profile(str(folder / "profile.toml")), 8)
    assert sorted(row_key(r) for _, r in rows.iterrows()) == sorted(p.key for p in points)
    assert set(rows["run_id"]) == {read_run_id(folder)}
    return rows


def test_concurrent_runs_and_resumes_record_every_point_once_in_its_own_run(tmp_path):
    """Two runs started together into one --out; then two resumes of one folder started together."""
    out = tmp_path / "out"
    tiny = [*TINY_SETS, "mesh.devices=[1,2]", "mesh.strategies=dp"]
    runs = [_popen("run", "smoke", "--out", out, "--no-analyze", *sets(*tiny, f"model.d_model=[{d}]"), cwd=tmp_path)
            for d in (64, 32)]
    for proc in runs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr
    folders = sorted(out.iterdir())
    assert len(folders) == 2
    by_width = {int(_assert_exact(f)["d_model"].iloc[0]): f for f in folders}
    assert sorted(by_width) == [32, 64] and len({(f / "run_id.txt").read_text() for f in folders}) == 2

    folder = by_width[64]
    lines = (folder / "runs.csv").read_text().splitlines(keepends=True)
    (folder / "runs.csv").write_text("".join(lines[:2]))  # as if stopped after its first point
    resumes = [_popen("run", "--resume", folder, "--no-analyze", cwd=tmp_path) for _ in range(2)]
    outcomes = []
    for proc in resumes:
        stdout, stderr = proc.communicate(timeout=300)
        outcomes.append((proc.returncode, stderr))
    codes = sorted(code for code, _ in outcomes)
    assert codes in ([0, 0], [0, 2]), outcomes  # the later one waits its turn: refused, or finds nothing left
    refused = [err for code, err in outcomes if code == 2]
    assert all(err.count("\n") == 1 and f"{folder}: in use by process" in err for err in refused), refused
    _assert_exact(folder)


def test_a_folder_in_use_is_refused_naming_its_holder(tmp_path):
    from jaxscale.folders import ReportDir

    held = ReportDir.create(tmp_path, "r")  # as a run holds it before its profile.toml is written
    proc = jaxscale("run", "--resume", held.path, "--no-analyze", cwd=tmp_path, env=cli_env(JAX_PLATFORMS="none"))
    held.release()
    _assert_refused(proc, tmp_path, [f"jaxscale: error: {held.path}: in use by process {os.getpid()} on "
                                     f"{socket.gethostname()} since "])


def _tiny_profile(*extra):
    from jaxscale.config import load_profile

    return load_profile("smoke", [*TINY_SETS, "mesh.devices=[1,2]", "mesh.strategies=dp", *extra])


def test_resume_refuses_another_profile(tmp_path):
    """JAX_PLATFORMS=none: any backend start would fail loudly, so each refusal comes before one."""
    env = cli_env(JAX_PLATFORMS="none")
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "profile.toml").write_text(_tiny_profile().to_toml())
    other = tmp_path / "other.toml"
    other.write_text(_tiny_profile("model.d_model=64", "run.name='other'").to_toml())
    proc = jaxscale("run", other, "--resume", folder, cwd=tmp_path, env=env)
    _assert_refused(proc, tmp_path, [f"--resume {folder}", "[model] d_model = 32 there, 64 here"])
    proc = jaxscale("run", "--resume", folder, *sets("run.steps=4"), cwd=tmp_path, env=env)
    _assert_refused(proc, tmp_path, ["[run] steps = 3 there, 4 here"])
    # Without a profile.toml, the rows decide.
    (folder / "profile.toml").unlink()
    with RowWriter(folder / "runs.csv") as w:
        w.append({"profile": "smoke", "status": "ok", "strategy": "dp", "n_devices": 1})
    proc = jaxscale("run", other, "--resume", folder, cwd=tmp_path, env=env)
    _assert_refused(proc, tmp_path, ["holds rows of profile 'smoke', not of 'other'"])
    assert len(read_rows(folder / "runs.csv")) == 1


def test_output_path_problems_are_one_line_before_any_backend(tmp_path):
    env = cli_env(JAX_PLATFORMS="none")
    (tmp_path / "file").write_text("x")
    for command in (["run", "smoke"], ["plan", "smoke", "--topology", "v5e:2x2"]):
        proc = jaxscale(*command, "--out", tmp_path / "file", cwd=tmp_path, env=env)
        _assert_refused(proc, tmp_path, ["--out", "is a file, not a folder"])
    if os.path.isdir("/sys") and subprocess.run(["mkdir", "/sys/jaxscale-probe"], capture_output=True).returncode:
        proc = jaxscale("run", "smoke", "--out", "/sys/jaxscale-out", cwd=tmp_path, env=env)
        _assert_refused(proc, tmp_path, ["--out /sys/jaxscale-out: cannot write in /sys"])
    proc = jaxscale("plan", "smoke", "--topology", "v5e:2x2 ", cwd=tmp_path, env=env)
    _assert_refused(proc, tmp_path, ["--topology 'v5e:2x2 '", "give --topology v5e:2x2"])
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_a_trace_selector_that_matches_nothing_is_refused(tmp_path):
    proc = jaxscale("run", "smoke", "--out", tmp_path / "out", "--trace", "strategy=fsdp,n_devices=16",
                    *sets(*TINY_SETS, "mesh.devices=[1,2]", "mesh.strategies=dp"), cwd=tmp_path)
    _assert_refused(proc, tmp_path, ["--trace 'strategy=fsdp,n_devices=16' matches none of the 2 points",
                                     "(their strategy: dp; n_devices: 1, 2)"])


def test_plan_counts_every_dropped_point():
    """smoke on a 4-chip slice: 8 devices drop 12 points (3 sizes x 4 strategies), fsdp_tp at 1 drops 3."""
    from jaxscale.plan import plan_grid
    from jaxscale.config import load_profile
    from jaxscale.grid import grid_size
    from jaxscale.targets import parse_target

    profile = load_profile("smoke")
    points, dropped = plan_grid(profile, parse_target("V5E:2x2"))
    assert grid_size(profile) == 48 and sum(dropped.values()) == 15 and len(points) == 33
    assert dropped["8 chips exceed the 4 of v5e:2x2"] == 12


def test_ctrl_c_during_a_plan_keeps_its_rows_and_says_how_to_plan_again(tmp_path, launch):
    env = cli_env(JAXSCALE_CACHE_DIR=tmp_path / "cache")
    # Its second point is held up (hooks/jaxscale_faults.py): planned points take well under a second, and
    # on a loaded machine the plan could otherwise end before the signal reaches it.
    cmd = [sys.executable, "-m", "jaxscale.cli", "plan", "smoke", "--topology", "v5e:2x2", "--out", str(tmp_path / "a"),
           "--no-analyze", *sets(*TINY_SETS, "model.d_model=[32,64]", "mesh.devices=[1,2,4]", "mesh.strategies=dp")]
    proc = launch(cmd, cwd=tmp_path, env={**env, "JAXSCALE_TEST_PAUSE": "1:3"})
    report = _wait_for_rows(tmp_path / "a", 1, proc, timeout=240)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "stopping after the current point" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "plan again" in out and "jaxscale plan smoke --topology v5e:2x2" in out
    assert 1 <= len(read_rows(report / "runs.csv")) < 6
    # The first point again: JAX's persistent cache cannot load an executable compiled for a TPU it has no
    # client for (it used to warn on stderr and compile again), so a plan does not use it.
    again = jaxscale("plan", "smoke", "--topology", "v5e:2x2", "--out", tmp_path / "b", "--no-analyze",
                     *sets(*TINY_SETS, "model.d_model=[32]", "mesh.devices=[1]", "mesh.strategies=dp"),
                     cwd=tmp_path, env=env)
    assert again.returncode == 0 and again.stderr == "", again.stderr
