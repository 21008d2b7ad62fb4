"""Two processes on 127.0.0.1, 4 CPU devices each, over jax.distributed (gloo collectives)."""

import socket
import subprocess
import sys
import time

import numpy as np

from helpers import TINY_SETS, cli_env, jaxscale, sets
from jaxscale.records import read_rows

GRID_SETS = ["model.d_model=32", "model.n_layers=1", "model.n_heads=8", "model.seq_len=8", "model.vocab=64",
             "run.steps=3", "run.warmup=1", "mesh.devices=[2,8]", "mesh.strategies=fsdp_tp"]
# fsdp_tp (model axis 2) at 2 devices is a (1, 2) mesh whose model axis spans both processes, at 8 a (4, 2) mesh
# whose data axis does: each axis's collectives cross hosts once.
GRID = sets(*GRID_SETS)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, port, extra=(), timeout=20, env_of=None):
    procs = []
    for pid in (0, 1):
        env = cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4", **(env_of or {}).get(pid, {}))
        cmd = [sys.executable, "-m", "jaxscale.cli", "run", "smoke", "--out", str(tmp_path / f"out{pid}"),
               "--no-analyze", *GRID, *extra, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", str(pid), "--timeout", str(timeout)]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def test_two_processes_run_one_sweep(tmp_path):
    procs = _launch(tmp_path, _port())
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert not (tmp_path / "out1").exists()  # only process 0 writes
    (csv,) = (tmp_path / "out0").glob("*/runs.csv")
    rows = read_rows(csv)
    assert "jaxscale runs" in outs[0][0] and "jaxscale runs" not in outs[1][0]
    assert (rows["n_processes"] == 2).all() and (rows["status"] == "ok").all()
    assert sorted(set(rows["n_devices"])) == [2, 8] and len(rows) == 2
    assert (rows["hosts"] == "p0;p1").all()  # every mesh takes devices from both processes
    # The same sweep in one process (this one, 8 devices): the same losses.
    from jaxscale import sweep
    from jaxscale.config import load_profile

    one = sweep.run_profile(load_profile("smoke", GRID_SETS), tmp_path / "single").rows
    assert (one["n_processes"] == 1).all()
    key = ["strategy", "n_devices"]
    both = rows.merge(one, on=key, suffixes=("", "_single"))
    assert len(both) == len(rows) == len(one)
    np.testing.assert_allclose(both["loss_first"], both["loss_first_single"], rtol=1e-5)
    np.testing.assert_allclose(both["loss_last"], both["loss_last_single"], rtol=1e-5)


def test_a_dead_peer_ends_the_run_with_a_clear_error(tmp_path):
    """Process 1 is killed after two points; process 0 is stopped by the heartbeat timeout it was given."""
    timeout = 10
    port = _port()
    procs = _launch(tmp_path, port, extra=sets("model.d_model=[32,64]"), timeout=timeout)
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((tmp_path / "out0").glob("*/runs.csv"))
        if found and len(found[0].read_text().splitlines()) >= 3:
            break
        time.sleep(0.1)
    procs[1].kill()
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 1
    last = err.strip().splitlines()[-1]
    assert f"127.0.0.1:{port}" in last and "process 0" in last and "--resume" in last
    assert f"stopped sending heartbeats for {timeout} s" in last  # what bounded the wait: the timeout given
    rows = read_rows(found[0])
    assert len(rows) >= 2 and (rows["status"] == "ok").all()


def test_an_unreachable_coordinator_is_an_error_in_bounded_time(tmp_path):
    """The process gives up by itself (a hang would exceed communicate's limit), naming the bound it waited:
    it could not join within the timeout, or JAX's client aborted it after that many seconds without the
    coordinator."""
    port, timeout = _port(), 2
    proc = jaxscale("run", "smoke", *GRID, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                    "--process-id", "1", "--timeout", timeout, cwd=tmp_path,
                    env=cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"), timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "process 1" in last and f"127.0.0.1:{port}" in last
    assert f"within {timeout} s" in last or f"heartbeats for {timeout} s" in last


def test_a_worker_that_dies_on_one_host_fails_its_point_on_every_host(tmp_path):
    """Worker processes per point: both hosts start the point's worker, the workers join one
    jax.distributed session; host 1's worker is killed mid-step (SIGKILL). Host 0's worker,
    waiting in a collective for its dead peer, is stopped by its owner; the point is one
    `crashed` row and both hosts go on to the next point."""
    timeout = 300  # longer than the whole run takes: a failure detected by heartbeats alone would exceed it
    grid = sets(*TINY_SETS, "mesh.devices=[2,4]", "mesh.strategies=dp", "run.isolation=process")
    procs = _launch(tmp_path, _port(), extra=grid, timeout=timeout,
                    env_of={1: {"JAXSCALE_TEST_CRASH": "n_devices=2"}})
    outs = [p.communicate(timeout=400) for p in procs]
    assert procs[0].returncode == 1, outs[0][1][-3000:]
    assert procs[1].returncode in (0, 1), outs[1][1][-3000:]
    (csv,) = (tmp_path / "out0").glob("*/runs.csv")
    rows = read_rows(csv).set_index("n_devices")
    assert list(rows["status"]) == ["crashed", "ok"]
    error = rows.loc[2, "error"]
    assert "another host" in error and "process 1" in error and "SIGKILL" in error and "injected crash" in error
    # the survivor's worker was stopped by its owner, not left to a heartbeat timeout
    assert "the point failed on another host" in error and "heartbeat" not in error
    assert rows.loc[4, "hosts"] == "p0;p1" and rows.loc[4, "n_processes"] == 2
