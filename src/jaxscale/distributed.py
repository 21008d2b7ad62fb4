"""jax.distributed: joining a session, supervising a process in one, and the hosts' key-value store.

A multi-host sweep runs one jaxscale process per host. Each joins one
jax.distributed session (explicit coordinator and ids, or JAX's cluster
detection), under a supervisor that outlives JAX's abort when a peer dies and
says which process stopped. Worker-process sweeps use only the session's
key-value store (``Owners``) to agree on each point across hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from typing import Any

SUPERVISED_ENV = "JAXSCALE_SUPERVISED"


class SetupError(RuntimeError):
    """The runtime could not be set up (no distributed session, no probe row); one line for the user."""


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
      SetupError: one line naming the process, the coordinator and the cause.
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
        raise SetupError(f"process {pid} could not join jax.distributed at {dist.where()} within {dist.timeout} s: "
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


class Owners:
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
            raise SetupError(f"process {self.process_id}: no {key!r} from the other hosts within {self.timeout} s "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None

    def entries(self, prefix: str) -> dict[str, Any]:
        """Every key under prefix, right now (no wait)."""
        pairs = self.client.key_value_dir_get(f"jaxscale/{prefix}/")
        return {k.rsplit("/", 1)[-1]: json.loads(v) for k, v in pairs}
