"""Test setup: 8 virtual CPU devices, set before JAX is imported anywhere."""

import os
import sys

import pytest

from helpers import FAST_COMPILE_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Fault injection (hooks/jaxscale_faults.py) in this process and in every Python process a test starts.
HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hooks")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HOOKS, os.environ.get("PYTHONPATH")) if p)
sys.path.insert(0, HOOKS)
import jaxscale_faults  # noqa: E402

jaxscale_faults.install_on_import()
# Calibrations and the compilation cache of tests stay out of the user's cache. The CPU's peak is planted for
# every device count the tests' processes have: measuring it takes each new count about 6 s, and no test reads
# the figure itself (test_devices measures a calibration of its own).
os.environ["JAXSCALE_CACHE_DIR"] = os.path.join(os.path.dirname(__file__), ".cache")
from helpers import plant_calibration  # noqa: E402

plant_calibration(os.environ["JAXSCALE_CACHE_DIR"], n_devices=(1, 2, 4, 8), dtypes=("float32", "bfloat16"))


@pytest.fixture
def no_plots(monkeypatch):
    """An analysis in this process draws no plots: for tests that read its tables and text, not its figures
    (drawing is most of an analysis' time; test_report and test_cli's run check the plots)."""
    from jaxscale import report

    monkeypatch.setattr(report, "plot_families", lambda *args, **kwargs: [])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """One tiny `jaxscale run smoke` (dp and fsdp on 1 and 2 devices, fsdp on 2 traced) into a cache folder of its
    own, with a planted calibration: test_tool reads its trace and its compilation cache, test_comparison compares
    it with a doctored copy. Run once per session: pytest-xdist workers share it through their common temporary
    folder, the first to arrive running it under a lock."""
    import fcntl
    from types import SimpleNamespace

    from helpers import TINY_SETS, cli_env, jaxscale, plant_calibration, sets

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "tiny_run"
    root.mkdir(exist_ok=True)
    cache = root / "cache"
    args = ["run", "smoke", "--no-analyze", "--trace", "strategy=fsdp,n_devices=2",
            *sets(*TINY_SETS, "mesh.devices=[1,2]", 'mesh.strategies=["dp","fsdp"]')]
    env = cli_env(JAXSCALE_CACHE_DIR=cache)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "entries.txt").exists():
            plant_calibration(cache)
            proc = jaxscale(*args, "--out", root / "runs", cwd=root, env=env)
            assert proc.returncode == 0, proc.stderr
            (root / "entries.txt").write_text("\n".join(sorted(p.name for p in (cache / "xla").iterdir())))
    (report,) = (root / "runs").iterdir()
    return SimpleNamespace(report=report, cache=cache, args=args, env=env,
                           cache_entries=(root / "entries.txt").read_text().split("\n"))


# The files that take longest (about a minute each on 2 cores), slowest first: with a file per worker
# (`-n auto --dist loadfile`), starting them first lets the workers finish together.
SLOW_FILES = ("test_plan.py", "test_reliability.py", "test_distributed.py", "test_workers.py", "test_step.py",
              "test_cli.py", "test_comparison.py", "test_tool.py", "test_speed_guard.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: file order kept within
