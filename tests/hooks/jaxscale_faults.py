"""Fault injection for the tests, through jaxscale.measure's seams (before_step, after_point).

A process the tests start imports this at start-up (sitecustomize.py beside it; conftest puts this
folder on PYTHONPATH), and it sets the seams once jaxscale.measure is imported. What they do is read
from the environment at each call, so a variable set after start-up (a worker's, set by its owner)
counts too:

- ``JAXSCALE_TEST_FAULT=SELECTOR``: the step of each matching point raises at its second dispatch.
- ``JAXSCALE_TEST_CRASH=SELECTOR``: the process running a matching point kills itself (SIGKILL) there.
- ``JAXSCALE_TEST_MEMORY_STATS=FILE``: allocator statistics for the CPU, which keeps none. FILE holds
  ``{"bytes_limit": N}``; ``peak_bytes_in_use`` behaves as a real allocator's: the high-water mark since
  the process started, here of the compiled totals of the points it ran (measured rows only).
- ``JAXSCALE_TEST_PAUSE=ROWS:SECONDS``: once a process has made ROWS rows (of points that compiled), it sleeps
  SECONDS before handing over each further one, so a test that signals the process once it sees
  ROWS rows finds it still inside a point however fast the points are and however late the signal comes. It
  says so on stderr first: a signal sent after that line lands in the sleep, never in a callback of XLA's.

SELECTOR is a point selector as ``--trace`` takes it (``strategy=fsdp,n_devices=2``).
"""

import importlib.util
import json
import os
import signal
import sys
import time

FAULT, CRASH, MEMORY = "JAXSCALE_TEST_FAULT", "JAXSCALE_TEST_CRASH", "JAXSCALE_TEST_MEMORY_STATS"
PAUSE = "JAXSCALE_TEST_PAUSE"
_peak = [0]
_rows = [0]


def before_step(point, i: int) -> None:
    from jaxscale.grid import matches, parse_selector

    if i < 1:
        return
    if os.environ.get(FAULT) and matches(point, parse_selector(os.environ[FAULT])):
        raise RuntimeError(f"injected fault ({FAULT}={os.environ[FAULT]})")
    if os.environ.get(CRASH) and matches(point, parse_selector(os.environ[CRASH])):
        print(f"injected crash ({CRASH}={os.environ[CRASH]})", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def after_point(row: dict) -> None:
    _rows[0] += 1
    if os.environ.get(PAUSE):
        after, seconds = os.environ[PAUSE].split(":")
        if _rows[0] > int(after):
            print(f"{PAUSE}: holding row {_rows[0]} for {seconds} s", file=sys.stderr, flush=True)
            time.sleep(float(seconds))
    if not os.environ.get(MEMORY) or str(row.get("row_source", "")).startswith("planned"):
        return
    with open(os.environ[MEMORY]) as f:
        limit = int(json.load(f)["bytes_limit"])
    _peak[0] = max(_peak[0], int(row.get("compiled_total_bytes") or 0))
    row["peak_bytes_in_use"], row["bytes_limit"] = _peak[0], limit


def reset_peak() -> None:
    """A new process's allocator, for a test that runs points in this one."""
    _peak[0] = 0


def install(measure) -> None:
    measure.before_step, measure.after_point = before_step, after_point


class _AfterMeasureImport:
    """A finder that lets jaxscale.measure load as usual, then installs the seams on it."""

    def find_spec(self, name, path=None, target=None):
        if name != "jaxscale.measure":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            install(module)

        spec.loader.exec_module = exec_module
        return spec


def install_on_import() -> None:
    if "jaxscale.measure" in sys.modules:
        install(sys.modules["jaxscale.measure"])
    else:
        sys.meta_path.insert(0, _AfterMeasureImport())
