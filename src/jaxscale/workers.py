"""Processes: the supervisor, jax.distributed set-up, and one worker process per grid point.

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
from typing import Any

SUPERVISED_ENV = "JAXSCALE_SUPERVISED"
STDERR_TAIL_CHARS = 1500
_POLL_S = 0.1

# Device nodes of accelerators JAX can drive: NVIDIA GPUs, TPUs (accel for v4 and
# earlier, vfio for v5 and later), AMD GPUs.
ACCELERATOR_NODES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio/0", "/dev/kfd")


class WorkerError(RuntimeError):
    """The runtime could not be set up (no probe row, no distributed session); one line for the user."""


# ------------------------------------------------------------- isolation


def accelerator_present() -> bool:
    """True where JAX may find a GPU or TPU, judged without initializing any backend."""
    platforms = {p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()}
    if platforms and platforms <= {"cpu"}:
        return False
    return any(os.path.exists(node) for node in ACCELERATOR_NODES)


def choose_isolation(run) -> str:
    """``process`` or ``none`` for a RunSpec, before anything initializes JAX.

    ``auto`` means worker processes wherever the backend keeps allocator
    statistics (a GPU or TPU is present), and in-process on the CPU, where
    there is no allocator peak to protect and a worker still costs its backend
    start and cache load (about 0.5 s a point on 2 cores, a third more time
    for the smoke profile with a warm cache). Non-empty XLA flag sets always
    need workers: XLA reads its flags once per process.

    Raises:
      ProfileError: flag sets with ``isolation = "none"``.
    """
    from jaxscale.config import ProfileError

    flagged = [f for f in run.xla_flags if f]
    if flagged:
        if run.isolation == "none":
            raise ProfileError(f"[run] isolation = 'none' with [run] xla_flags = {list(run.xla_flags)}: XLA reads "
                               "its flags once per process, so flag sets need a worker process per point; set "
                               "[run] isolation = \"process\" or \"auto\" (--set run.isolation=process)")
        return "process"
    if run.isolation != "auto":
        return run.isolation
    return "process" if accelerator_present() else "none"


# ------------------------------------------------------ device memory

# What decides how much device memory JAX's GPU allocator may take. The user's
# setting of any of them wins over max_memory_fraction.
ALLOCATOR_ENV = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                 "XLA_PYTHON_CLIENT_ALLOCATOR")
# JAX's own default share of a GPU's memory (docs: GPU memory allocation).
JAX_DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Allocator:
    """How a point's process sets up JAX's GPU allocator (no effect on a CPU or TPU).

    Attributes:
      env: variables to set before the backend starts ({} where the user's own win).
      memory_fraction: the share of the device's memory the allocator may take,
        where it is known (None: the user chose an allocator whose limit is not a fraction).
      set_by: ``jaxscale`` (from ``max_memory_fraction``) or ``user`` (their environment).
      settings: the allocator variables in effect, as set.
    """

    env: dict
    memory_fraction: float | None
    set_by: str
    settings: dict

    def describe(self) -> dict:
        return {"memory_fraction": self.memory_fraction, "set_by": self.set_by, "env": self.settings}


def allocator_for(max_memory_fraction: float, environ=None) -> Allocator:
    """JAX's GPU allocator limit from ``[run] max_memory_fraction``, unless the user set it up themselves.

    JAX's allocator takes 75% of a GPU by default, so without this a step that
    needs 80% would fail on a device that has room for it, and the budget would
    be a fraction of a fraction. Where the user has set any of ALLOCATOR_ENV,
    nothing is changed and their setting is recorded.
    """
    environ = os.environ if environ is None else environ
    user = {k: environ[k] for k in ALLOCATOR_ENV if environ.get(k)}
    if not user:
        value = f"{max_memory_fraction:g}"
        return Allocator({"XLA_PYTHON_CLIENT_MEM_FRACTION": value}, max_memory_fraction, "jaxscale",
                         {"XLA_PYTHON_CLIENT_MEM_FRACTION": value})
    fraction = user.get("XLA_CLIENT_MEM_FRACTION") or user.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if user.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default").lower() == "platform":
        known = None  # allocates on demand from the driver: no fixed limit
    else:
        known = float(fraction) if fraction else JAX_DEFAULT_MEM_FRACTION
    return Allocator({}, known, "user", user)


def allocator_in_process(max_memory_fraction: float) -> Allocator:
    """allocator_for, applied to this process's environment if JAX's backends have not started yet."""
    allocator = allocator_for(max_memory_fraction)
    if not allocator.env:
        return allocator
    if _backends_started():
        return Allocator({}, None, "unknown", {"note": "JAX's backends started before jaxscale could set the "
                                                       "allocator up; its limit is JAX's or the caller's"})
    os.environ.update(allocator.env)
    return allocator


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(getattr(xla_bridge, "_backends", None))
    except Exception:  # an internal module: where it moves, assume the worst
        return True


# ------------------------------------------------------ jax.distributed


@dataclasses.dataclass(frozen=True)
class Distributed:
    """How to join jax.distributed: explicit values, or JAX's cluster detection where they are None.

    Attributes:
      coordinator: HOST:PORT of process 0's coordinator.
      num_processes, process_id: this process's place in the session.
      timeout: seconds to wait for the coordinator and peers, and after which a
        silent peer is declared dead.
      auto: join where a cluster is detected (Cloud TPU, SLURM, MPI) although
        nothing explicit was given.
    """

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout: int = 120
    auto: bool = True

    @classmethod
    def from_args(cls, args) -> "Distributed":
        return cls(coordinator=args.coordinator, num_processes=args.num_processes, process_id=args.process_id,
                   timeout=args.timeout, auto=args.distributed != "off")

    @property
    def wanted(self) -> bool:
        explicit = self.coordinator or self.num_processes is not None or self.process_id is not None
        return bool(explicit or (self.auto and cluster_detected()))

    def where(self) -> str:
        return self.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "the detected coordinator"

    def who(self) -> str:
        return f"process {self.process_id}" if self.process_id is not None else "this process"


def cluster_detected() -> bool:
    """True where JAX's own cluster detection has several processes to find."""
    env = os.environ

    def more_than_one(name: str) -> bool:
        try:
            return int(env.get(name, "1")) > 1
        except ValueError:
            return False

    return (more_than_one("SLURM_NTASKS") or more_than_one("OMPI_COMM_WORLD_SIZE")
            or "," in env.get("TPU_WORKER_HOSTNAMES", "") or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def init_distributed(dist: Distributed, collectives: bool = True) -> None:
    """Join jax.distributed, bounding the wait for the coordinator and the heartbeat by ``dist.timeout``.

    Args:
      dist: the session to join.
      collectives: set up CPU collectives across processes (gloo) for a process
        that will run steps; an owner that only uses the key-value store skips it.

    Raises:
      WorkerError: one line naming the process, the coordinator and the cause.
    """
    import jax

    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"coordinator_address": dist.coordinator, "num_processes": dist.num_processes,
              "process_id": dist.process_id}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=dist.timeout,
                                   heartbeat_timeout_seconds=dist.timeout, shutdown_timeout_seconds=dist.timeout)
    except Exception as e:  # jax raises XlaRuntimeError / RuntimeError / ValueError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pid = dist.process_id if dist.process_id is not None else "?"
        raise WorkerError(f"process {pid} could not join jax.distributed at {dist.where()} within {dist.timeout} s: "
                          f"{first}") from None


def die_with_parent() -> None:
    """In a child: be killed when its parent dies (Linux), as if one process."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def supervise(argv: list[str], dist: Distributed) -> int:
    """Run this command in a child process and explain how it ended.

    When a peer dies, JAX's distributed runtime aborts the survivors from C++
    after the heartbeat timeout; no Python code runs then. The parent outlives
    the abort and says which process stopped, against which coordinator.
    """
    env = {**os.environ, SUPERVISED_ENV: "1"}
    # A session of its own: a terminal's Ctrl-C reaches this process alone, which passes it on once (in the
    # terminal's process group the child would get it twice, and a second Ctrl-C aborts the point).
    child = subprocess.Popen([sys.executable, "-m", "jaxscale.cli", *argv], env=env, preexec_fn=die_with_parent,
                             start_new_session=True)
    previous = signal.signal(signal.SIGINT, lambda *_: child.send_signal(signal.SIGINT))
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code < 0 or code == 134:
        reason = signal.Signals(-code).name if code < 0 else "SIGABRT"
        print(f"jaxscale: error: {dist.who()} stopped ({reason}): the jax.distributed service at {dist.where()} "
              f"reported a peer that stopped sending heartbeats for {dist.timeout} s, or the coordinator itself is "
              "gone; rows finished before are kept, and `jaxscale run --resume REPORT_DIR` on every host continues "
              "the sweep", file=sys.stderr)
        return 1
    return code


def supervised() -> bool:
    return bool(os.environ.get(SUPERVISED_ENV))


def configure_compile_cache(enabled: bool) -> None:
    """JAX's persistent compilation cache under jaxscale's cache folder (before the first compile)."""
    import jax

    if enabled and os.environ.get("JAXSCALE_COMPILE_CACHE", "1") != "0":
        from jaxscale.devices import cache_dir

        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


class _Owners:
    """The owners' jax.distributed session: a key-value store shared by the hosts, no devices."""

    def __init__(self, dist: Distributed):
        init_distributed(dist, collectives=False)
        from jax._src.distributed import global_state

        self.client = global_state.client
        self.process_id = int(global_state.process_id)
        self.num_processes = int(global_state.num_processes)
        self.host = (global_state.coordinator_address or "127.0.0.1").rsplit(":", 1)[0]
        self.timeout = dist.timeout

    def set(self, key: str, value: Any) -> None:
        self.client.key_value_set(f"jaxscale/{key}", json.dumps(value))

    def get(self, key: str) -> Any:
        """The value process 0 (or a peer) publishes under key, waiting up to the timeout."""
        try:
            return json.loads(self.client.blocking_key_value_get(f"jaxscale/{key}", self.timeout * 1000))
        except Exception as e:
            raise WorkerError(f"process {self.process_id}: no {key!r} from the other hosts within {self.timeout} s "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None

    def entries(self, prefix: str) -> dict[str, Any]:
        """Every key under prefix, right now (no wait)."""
        pairs = self.client.key_value_dir_get(f"jaxscale/{prefix}/")
        return {k.rsplit("/", 1)[-1]: json.loads(v) for k, v in pairs}


class WorkerRuntime:
    """The owner's side of isolation ``process``: a probe worker, then one worker per point.

    Attributes (from the probe): device_count, process_count, describe (devices
    and host), columns (the runtime columns of a row), peak (a PeakInfo),
    budget (bytes a point may plan to use per device).
    """

    isolation = "process"

    def __init__(self, profile, *, dist: Distributed | None = None, compile_cache: bool = True):
        from jaxscale import devices as devinfo
        from jaxscale import sweep

        self.profile = profile
        self.compile_cache = compile_cache
        self.base_xla_flags = os.environ.get("XLA_FLAGS", "")
        self.allocator = allocator_for(profile.run.max_memory_fraction)
        self.dist = dist if dist is not None and dist.wanted else None
        self.owners = _Owners(self.dist) if self.dist else None
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
                    raise WorkerError(f"the worker that inspects the devices failed: {ended.describe()}")
                info = ended.result
        except BaseException:
            self.close()
            raise
        self.device_count, self.process_count = info["device_count"], info["process_count"]
        self.describe, self.columns = info["describe"], info["columns"]
        self.peak = devinfo.PeakInfo(**info["peak"])
        self.memory_facts = info["memory"]
        self.memory = sweep.MemoryBudget(**info["memory"])

    # -- the sweep's interface (see sweep.InProcess)

    def broadcast(self, values: list[int]) -> list[int]:
        """Process 0's values, on every host."""
        if self.owners is None:
            return list(values)
        if self.owners.process_id == 0:
            self.owners.set("todo", list(map(int, values)))
        return self.owners.get("todo")

    def measure(self, point, index: int, trace_dir: Path | None) -> dict:
        """Run one point in a worker (one per host) and return its row; a crash becomes a ``crashed`` row."""
        from jaxscale import sweep

        spec = {"task": "point", "profile": self.profile.raw, "source": self.profile.source,
                "point": dataclasses.asdict(point), "trace_dir": str(trace_dir) if trace_dir else None,
                "memory": self.memory_facts}
        ended = self._run_everywhere(f"point/{index}", spec, xla_flags=point.xla_flags)
        if ended.result is not None and ended.result.get("row") is not None:
            row = ended.result["row"]
        else:
            row = sweep.base_row(point, self.profile, self.columns)
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
            raise WorkerError("the zygote that forks jaxscale's workers stopped answering")
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

    import jax  # noqa: F401  (imported here once, for every forked worker)

    from jaxscale import sweep  # noqa: F401

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


def _point_from_dict(d: dict):
    from jaxscale.config import ModelSpec
    from jaxscale.grid import Point

    return Point(**{**d, "model": ModelSpec(**d["model"])})


def _do_task(spec: dict) -> dict:
    """``probe``: the devices, runtime columns, peak and memory budget; ``point``: the point's row."""
    import jax

    from jaxscale import devices as devinfo
    from jaxscale import sweep

    if spec["task"] == "probe":
        peak = devinfo.resolve_peak(spec["dtype"])
        memory = sweep.memory_budget(peak, spec["fraction"], spec.get("allocator_fraction"))
        return {"device_count": jax.device_count(), "process_count": jax.process_count(),
                "describe": devinfo.describe(), "columns": sweep.runtime_columns(),
                "peak": dataclasses.asdict(peak), "memory": dataclasses.asdict(memory)}
    from jaxscale.config import build_profile

    profile = build_profile(spec["profile"], spec["source"])
    point = _point_from_dict(spec["point"])
    peak = devinfo.resolve_peak(profile.run.dtype)
    trace_dir = Path(spec["trace_dir"]) if spec.get("trace_dir") else None
    return {"row": sweep.measure_point(point, profile, peak, trace_dir, sweep.MemoryBudget(**spec["memory"]))}


def worker_main(spec_path: str) -> int:
    """A worker: set up JAX, do one task (``probe`` or ``point``), write the result file, exit.

    The result is written atomically (a temporary file renamed into place), so
    the owner sees a whole result or none.
    """
    spec = json.loads(Path(spec_path).read_text())
    die_with_parent()  # here rather than in a preexec_fn: the owner may hold JAX's threads, and fork with them
    if os.getppid() != spec["owner_pid"]:
        return 1  # the owner died before the line above ran
    import jax

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
