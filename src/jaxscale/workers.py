"""Worker processes: one per grid point, forked from a zygote; a crash costs one row.

A sweep measures its points either in its own process (isolation ``none``) or
each in a fresh worker process (``process``), started by the process that owns
the sweep (the owner). A worker compiles its point (through JAX's persistent
compilation cache), runs it and hands back one row, which the owner appends. A
fresh process per point gives every point its own device-allocator high-water
mark (``peak_bytes_in_use``: neither JAX nor XLA can reset it), its own XLA
flags (XLA reads them once per process), and a crash that costs one row: a
worker that dies by a signal or exits without a row becomes a ``crashed`` row
with its exit code or signal and the tail of its stderr.

The owner never initializes a JAX backend in this mode (an accelerator opened
by the owner would be unavailable to, or share memory with, its workers): a
first worker, the probe, reports the devices, the peak and the memory budget.

Several hosts: the owners join one jax.distributed session for the whole sweep
and use only its key-value store; no owner opens a device. For each point the
process-0 owner publishes a fresh coordinator port, every host starts the
point's worker, and the workers join a jax.distributed session of their own for
that point. Each owner posts how its worker ended; an owner whose peer's worker
crashed kills its own at once, so the point fails on every host and the sweep
goes on to the next point everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax

from jaxscale import devices
from jaxscale.config import ModelSpec, build_profile
from jaxscale.distributed import (SUPERVISED_ENV, Distributed, Owners, SetupError, die_with_parent,
                                  init_distributed)
from jaxscale.grid import Point
from jaxscale.measure import base_row, measure_point
from jaxscale.memory import MemoryBudget, allocator_for, memory_budget
from jaxscale.startup import accelerator_present, configure_compile_cache
from jaxscale.targets import runtime_columns

STDERR_TAIL_CHARS = 1500
_POLL_S = 0.1


# ------------------------------------------------------------- the owner


@dataclasses.dataclass(frozen=True)
class Ended:
    """How one worker ended: its result (None when it left none), exit code, and stderr tail."""

    result: dict | None
    returncode: int | None
    stderr_tail: str
    peer_failure: str = ""  # set when the point failed on another host (this worker was stopped, or is moot)

    def describe(self) -> str:
        """One line: how the worker ended, with the tail of its stderr."""
        if self.peer_failure:
            how = f"the point failed on another host: {self.peer_failure}"
        elif self.returncode is not None and self.returncode < 0:
            how = f"worker killed by {signal.Signals(-self.returncode).name} (signal {-self.returncode})"
        else:
            how = f"worker exited with code {self.returncode} without a row"
        tail = " | ".join(line.strip() for line in self.stderr_tail.splitlines() if line.strip())
        return f"{how}; stderr: {tail[-STDERR_TAIL_CHARS:]}" if tail else how


class WorkerRuntime:
    """The owner's side of isolation ``process``: a probe worker, then one worker per point.

    Attributes (from the probe): device_count, process_count, describe (devices
    and host), columns (the runtime columns of a row), peak (a PeakInfo),
    budget (bytes a point may plan to use per device).
    """

    isolation = "process"

    def __init__(self, profile, *, dist: Distributed | None = None, compile_cache: bool = True):
        self.profile = profile
        self.compile_cache = compile_cache
        self.base_xla_flags = os.environ.get("XLA_FLAGS", "")
        self.allocator = allocator_for(profile.run.max_memory_fraction)
        self.dist = dist if dist is not None and dist.wanted else None
        self.owners = Owners(self.dist) if self.dist else None
        self.lead = self.owners is None or self.owners.process_id == 0
        self._tmp = Path(tempfile.mkdtemp(prefix="jaxscale-workers-"))
        self._count = 0
        self._zygote = _Zygote.start()
        probe = {"task": "probe", "dtype": profile.run.dtype, "fraction": profile.run.max_memory_fraction,
                 "allocator_fraction": self.allocator.memory_fraction}
        try:
            if self.owners is None and not accelerator_present():
                info = _do_task(probe)  # only the CPU here: the owner may open it itself, and save a worker
            else:
                ended = self._run_everywhere("probe", probe)
                if ended.result is None:
                    raise SetupError(f"the worker that inspects the devices failed: {ended.describe()}")
                info = ended.result
        except BaseException:
            self.close()
            raise
        self.device_count, self.process_count = info["device_count"], info["process_count"]
        self.describe, self.columns = info["describe"], info["columns"]
        self.peak = devices.PeakInfo(**info["peak"])
        self.memory_facts = info["memory"]
        self.memory = MemoryBudget(**info["memory"])

    # -- the runtime interface (see runtimes.py)

    def broadcast(self, values: list[int]) -> list[int]:
        """Process 0's values, on every host."""
        if self.owners is None:
            return list(values)
        if self.owners.process_id == 0:
            self.owners.set("todo", list(map(int, values)))
        return self.owners.get("todo")

    def measure(self, point, index: int, trace_dir: Path | None) -> dict:
        """Run one point in a worker (one per host) and return its row; a crash becomes a ``crashed`` row."""
        spec = {"task": "point", "profile": self.profile.raw, "source": self.profile.source,
                "point": dataclasses.asdict(point), "trace_dir": str(trace_dir) if trace_dir else None,
                "memory": self.memory_facts}
        ended = self._run_everywhere(f"point/{index}", spec, xla_flags=point.xla_flags)
        if ended.result is not None and ended.result.get("row") is not None:
            row = ended.result["row"]
        else:
            row = base_row(point, self.profile, self.columns)
            row.update(status="crashed", error=ended.describe())
        row["isolation"] = "process"
        return row

    def should_stop(self, index: int, stop: bool) -> bool:
        """Stop after point ``index`` when any host was asked to (Ctrl-C)."""
        if self.owners is None:
            return stop
        self.owners.set(f"stop/{index}/{self.owners.process_id}", bool(stop))
        return any(self.owners.get(f"stop/{index}/{p}") for p in range(self.owners.num_processes))

    def close(self) -> None:
        import shutil

        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -- workers

    def _run_everywhere(self, name: str, spec: dict, xla_flags: str = "") -> Ended:
        """Run a worker on every host for one task; the outcome as process 0 should record it."""
        if self.owners is None:
            return self._run(spec, xla_flags)
        o = self.owners
        if o.process_id == 0:
            o.set(f"{name}/coordinator", f"{o.host}:{_free_port()}")
        coordinator = o.get(f"{name}/coordinator")
        spec = {**spec, "distributed": {"coordinator": coordinator, "num_processes": o.num_processes,
                                        "process_id": o.process_id, "timeout": self.dist.timeout}}

        def peer_crashed() -> str:
            for pid, status in o.entries(f"{name}/ended").items():
                if status.get("crashed") and not status.get("stopped"):
                    return f"process {pid}: {status['crashed']}"
            return ""

        ended = self._run(spec, xla_flags, peer_crashed)
        mine = {"crashed": "" if ended.result is not None else ended.describe(), "stopped": bool(ended.peer_failure)}
        o.set(f"{name}/ended/{o.process_id}", mine)
        while True:  # every host's worker has ended before any host goes on
            statuses = o.entries(f"{name}/ended")
            if len(statuses) >= o.num_processes:
                break
            time.sleep(_POLL_S)
        failures = [f"process {pid}: {s['crashed']}" for pid, s in sorted(statuses.items())
                    if s.get("crashed") and not s.get("stopped")]
        if failures and (ended.result is not None or ended.peer_failure):
            # a peer's worker crashed: the point failed on every host, whatever this one's did
            return Ended(result=None, returncode=ended.returncode, stderr_tail="", peer_failure="; ".join(failures))
        return ended

    def _run(self, spec: dict, xla_flags: str, peer_crashed=None) -> Ended:
        """Start one worker, wait for it, and read its result."""
        self._count += 1
        stem = self._tmp / f"w{self._count}"
        spec_path, result_path, log_path = (stem.with_suffix(s) for s in (".json", ".result.json", ".log"))
        env = {SUPERVISED_ENV: "", "XLA_FLAGS": f"{self.base_xla_flags} {xla_flags}".strip(), **self.allocator.env}
        if self._zygote is not None and not self._zygote.alive():
            self._zygote = _Zygote.start()
        parent = self._zygote.pid if self._zygote is not None else os.getpid()
        spec_path.write_text(json.dumps({**spec, "result": str(result_path), "compile_cache": self.compile_cache,
                                         "owner_pid": parent}))
        if self._zygote is not None:
            proc = self._zygote.fork(spec_path, log_path, env)
        else:
            proc = _Spawned(spec_path, log_path, env)
        peer_failure = ""
        try:
            while proc.wait(_POLL_S) is None:  # returns as soon as the worker ends
                if peer_crashed is not None:
                    peer_failure = peer_crashed()
                    if peer_failure:
                        proc.kill()
                        break
        except BaseException:  # a second Ctrl-C: the worker must not outlive the owner's loop
            proc.kill()
            raise
        result = None
        if not peer_failure and result_path.exists():
            result = json.loads(result_path.read_text())
        tail = log_path.read_bytes()[-4 * STDERR_TAIL_CHARS:].decode(errors="replace") if log_path.exists() else ""
        for path in (spec_path, result_path, log_path):
            path.unlink(missing_ok=True)
        return Ended(result=result, returncode=proc.returncode, stderr_tail=tail, peer_failure=peer_failure)


class _Spawned:
    """A worker started as a new interpreter (when no zygote could be started)."""

    def __init__(self, spec_path: Path, log_path: Path, env: dict):
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen([sys.executable, "-m", "jaxscale.workers", str(spec_path)],
                                          env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT,
                                          start_new_session=True)  # a terminal's Ctrl-C goes to the owner only

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def wait(self, timeout: float) -> int | None:
        """The exit code, waiting up to timeout seconds for it (None: still running)."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()


class _Zygote:
    """A process that has imported JAX, Flax, optax and jaxscale but opened no device, forking a worker per task.

    A fork skips what a new interpreter pays before the point's own work (about
    2 s of imports on 2 cores); each worker still initializes its backend, with
    its own XLA_FLAGS, after the fork. No JAX backend, hence none of its
    threads, exists in the zygote, so forking it is safe. Requests and replies
    are JSON lines: {"spec", "log", "env"} in; {"pid"} then {"exit"} out.
    """

    def __init__(self, proc: subprocess.Popen):
        self._proc = proc
        self._buffer = b""
        self.pid = proc.pid

    @classmethod
    def start(cls) -> "_Zygote | None":
        proc = subprocess.Popen([sys.executable, "-m", "jaxscale.workers", "--zygote", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        zygote = cls(proc)
        if zygote.read(timeout=300) != {"ready": True}:
            proc.kill()
            proc.wait()
            return None
        return zygote

    def alive(self) -> bool:
        return self._proc.poll() is None

    def read(self, timeout: float | None) -> dict | None:
        """The next reply, waiting up to timeout seconds (None: no reply yet; {} : the zygote is gone)."""
        import select

        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return {}
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def fork(self, spec_path: Path, log_path: Path, env: dict) -> "_Forked":
        self._proc.stdin.write(json.dumps({"spec": str(spec_path), "log": str(log_path), "env": env}).encode() + b"\n")
        self._proc.stdin.flush()
        reply = self.read(timeout=60)
        if not reply or "pid" not in reply:
            raise SetupError("the zygote that forks jaxscale's workers stopped answering")
        return _Forked(self, reply["pid"])

    def close(self) -> None:
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


class _Forked:
    """A worker forked by the zygote; the zygote reports its exit status."""

    def __init__(self, zygote: _Zygote, pid: int):
        self._zygote, self.pid, self.returncode = zygote, pid, None

    def wait(self, timeout: float | None) -> int | None:
        """The exit code, waiting up to timeout seconds for it (None: still running)."""
        if self.returncode is None:
            reply = self._zygote.read(timeout=timeout)
            if reply == {}:  # the zygote died, and its worker with it (PR_SET_PDEATHSIG)
                self.returncode = -signal.SIGKILL
            elif reply is not None:
                self.returncode = reply["exit"]
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(timeout=None)


def zygote_main(owner_pid: int) -> int:
    """The zygote: import everything a worker needs, then fork one worker per request on stdin."""
    die_with_parent()
    if os.getppid() != owner_pid:
        return 1
    import traceback

    out = sys.stdout.buffer

    def reply(message: dict) -> None:
        out.write(json.dumps(message).encode() + b"\n")
        out.flush()

    reply({"ready": True})
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setsid()
                log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.environ.update(request["env"])
                code = worker_main(request["spec"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 1)
        reply({"pid": pid})
        _, status = os.waitpid(pid, 0)
        reply({"exit": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)})
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------- the worker


def _point_from_dict(d: dict) -> Point:
    return Point(**{**d, "model": ModelSpec(**d["model"])})


def _do_task(spec: dict) -> dict:
    """``probe``: the devices, runtime columns, peak and memory budget; ``point``: the point's row."""
    if spec["task"] == "probe":
        peak = devices.resolve_peak(spec["dtype"])
        memory = memory_budget(peak, spec["fraction"], spec.get("allocator_fraction"))
        return {"device_count": jax.device_count(), "process_count": jax.process_count(),
                "describe": devices.describe(), "columns": runtime_columns(),
                "peak": dataclasses.asdict(peak), "memory": dataclasses.asdict(memory)}
    profile = build_profile(spec["profile"], spec["source"])
    point = _point_from_dict(spec["point"])
    peak = devices.resolve_peak(profile.run.dtype)
    trace_dir = Path(spec["trace_dir"]) if spec.get("trace_dir") else None
    return {"row": measure_point(point, profile, peak, runtime_columns(), trace_dir, MemoryBudget(**spec["memory"]))}


def worker_main(spec_path: str) -> int:
    """A worker: set up JAX, do one task (``probe`` or ``point``), write the result file, exit.

    The result is written atomically (a temporary file renamed into place), so
    the owner sees a whole result or none.
    """
    spec = json.loads(Path(spec_path).read_text())
    die_with_parent()  # here rather than in a preexec_fn: the owner may hold JAX's threads, and fork with them
    if os.getppid() != spec["owner_pid"]:
        return 1  # the owner died before the line above ran
    configure_compile_cache(spec.get("compile_cache", True))
    dist = spec.get("distributed")
    if dist:
        init_distributed(Distributed(**dist, auto=False))
    result = _do_task(spec)
    path = Path(spec["result"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=_jsonable))
    os.replace(tmp, path)
    if dist:
        jax.distributed.shutdown()  # wait for the peers, so none loses its coordinator mid-step
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown; the result is already in place


def _jsonable(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


if __name__ == "__main__":
    if sys.argv[1] == "--zygote":
        sys.exit(zygote_main(int(sys.argv[2])))
    sys.exit(worker_main(sys.argv[1]))
